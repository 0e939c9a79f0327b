"""The machine's memory read bandwidth, measured the way decode reads weights and KV: a streaming
reduction over a buffer much larger than the last-level cache, on all of torch's threads."""

from __future__ import annotations

import time

import torch


def read_bandwidth(device: str | torch.device = "cpu", mib: int = 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` full reads of a ``mib`` MiB float32 buffer, in bytes/s."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
