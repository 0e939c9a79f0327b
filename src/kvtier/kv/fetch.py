"""Decode attention on a GPU over blocks that also sit in host memory (or on disk): fetch, then attend.

Each layer's blocks are copied to the GPU in table order, into one buffer per layer [B * W, Hkv, bs, D],
and attention runs once over each sequence's whole table (``gathered_decode_attention``): the plain
cache's arithmetic on the same values, so tiered policies stay exact in any dtype. This is the
simulator's ``--offload fetch`` with a prefetch depth of 1:

- the next layer's off-GPU blocks are copied on a side stream while this layer computes (the copy
  stream first waits for the compute stream, so a buffer is never overwritten while still read);
- blocks that are consecutive both in their tier and in a table go over as one DMA straight from
  the (pinned) tier; scattered ones are gathered into pinned memory by the CPU first.

Without CUDA (tests force the path on the CPU) the same copies run in order on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

Runs = list[tuple[int, int, int]]  # (first entry of the flat table, first slot, count)
MAX_RUNS_SHARE = 1 / 16  # more runs than this share of a part's blocks: gather rows (a copy costs ~10 us)


@dataclass(slots=True)
class FetchPart:
    target: int
    local: bool  # in the engine's device tier: read in place; else copied over (host, disk)
    entries: torch.Tensor  # [n] entries of the flat [B * W] table, on the GPU
    slots: torch.Tensor  # [n] their slots, on the target's device
    runs: Runs | None  # consecutive (entry, slot) runs, when few enough to copy one by one


@dataclass(slots=True)
class DecodeFetch:
    """One step's fetch plan and its in-flight copies."""

    blocks: np.ndarray  # [B, W] logical ids (-1: padding)
    invalid: torch.Tensor  # [B, 1, 1, W * bs] True past each context
    new_entries: torch.Tensor  # [B] entry of the flat table holding each sequence's new token
    new_offsets: torch.Tensor  # [B] its position in that block
    parts: list[FetchPart]
    tokens: dict[int, int]  # cached tokens attention reads, per target
    device: torch.device
    stream: torch.cuda.Stream | None = None  # the copy stream (None: copy in order)
    pending: dict = field(default_factory=dict)  # layer -> (k, v, event): off-device blocks already copied

    def start(self, layer: int, storages: list) -> None:
        """Copy ``layer``'s off-device blocks into fresh buffers (on the copy stream when there is one)."""
        k0 = storages[0].layer(layer)[0]
        b, w = self.blocks.shape
        k = torch.zeros((b * w, *k0.shape[1:]), dtype=k0.dtype, device=self.device)  # padding: finite, masked
        v = torch.zeros_like(k)
        event = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._copy_off_device(layer, storages, k, v)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            self._copy_off_device(layer, storages, k, v)
        self.pending[layer] = (k, v, event)

    def take(self, layer: int, storages: list, k_new: torch.Tensor, v_new: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, Hkv, W * bs, D] of ``layer`` in table order. ``k_new``, ``v_new`` [B, Hkv, D]: this step's
        tokens, written to the cache after the layer's copies may have started, so put in from here."""
        if layer not in self.pending:
            self.start(layer, storages)
        k, v, event = self.pending.pop(layer)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for p in self.parts:
            if p.local:
                kc, vc = storages[p.target].layer(layer)
                k[p.entries], v[p.entries] = kc[p.slots], vc[p.slots]
        k[self.new_entries, :, self.new_offsets] = k_new.to(k.dtype)  # as the cache rounded them
        v[self.new_entries, :, self.new_offsets] = v_new.to(v.dtype)
        b, w = self.blocks.shape
        hkv, bs, d = k.shape[1:]
        return tuple(x.view(b, w, hkv, bs, d).transpose(1, 2).reshape(b, hkv, w * bs, d) for x in (k, v))

    def _copy_off_device(self, layer: int, storages: list, k: torch.Tensor, v: torch.Tensor) -> None:
        for p in self.parts:
            if p.local:
                continue
            for dst, src in zip((k, v), storages[p.target].layer(layer), strict=True):
                if p.runs is not None:
                    for entry, slot, n in p.runs:
                        dst[entry: entry + n].copy_(src[slot: slot + n], non_blocking=True)
                else:
                    dst[p.entries] = _pinned_rows(src, p.slots).to(self.device, non_blocking=True)


def plan_fetch(table: np.ndarray, context_lens: list[int], target_of: np.ndarray, slot_of: np.ndarray,
               storages: list, block_size: int, device: torch.device) -> DecodeFetch:
    """``table``: [B, W] logical block ids (-1 padded); ``target_of``/``slot_of``: where each block is."""
    ids = np.maximum(table, 0)
    tgt = np.where(table >= 0, target_of[ids], -1).ravel()
    slots = slot_of[ids].ravel()
    parts = []
    for t in np.unique(tgt[tgt >= 0]):
        entries = np.nonzero(tgt == t)[0]
        storage = storages[int(t)]
        where = storage.target_device
        runs = _runs(entries, slots[entries])
        parts.append(FetchPart(int(t), storage.target.k_tier == "device", torch.as_tensor(entries, device=device),
                               torch.as_tensor(slots[entries], device=where),
                               runs if len(runs) <= max(1, MAX_RUNS_SHARE * len(entries)) else None))
    ctx = np.asarray(context_lens, dtype=np.int64)
    new = np.arange(len(ctx)) * table.shape[1] + (ctx - 1) // block_size
    per_entry = np.full(table.size, block_size, dtype=np.int64)
    per_entry[new] = (ctx - 1) % block_size + 1  # each sequence's last block holds the rest
    tokens = {p.target: int(per_entry[tgt == p.target].sum()) for p in parts}
    as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
    pos = torch.arange(table.shape[1] * block_size, device=device)
    invalid = (pos[None, :] >= as_t(ctx)[:, None])[:, None, None, :]
    stream = _copy_stream(device) if not all(p.local for p in parts) else None
    return DecodeFetch(table, invalid, as_t(new), as_t((ctx - 1) % block_size), parts, tokens, device, stream)


def _runs(entries: np.ndarray, slots: np.ndarray) -> Runs:
    """Maximal runs where both the table entry and the slot go up by one."""
    breaks = np.nonzero((np.diff(entries) != 1) | (np.diff(slots) != 1))[0] + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(entries)]))
    return [(int(entries[s]), int(slots[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _pinned_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``cache[slots]`` gathered by the CPU into pinned memory (where CUDA is), ready for one async DMA."""
    rows = torch.empty((len(slots), *cache.shape[1:]), dtype=cache.dtype, pin_memory=torch.cuda.is_available())
    return torch.index_select(cache, 0, slots, out=rows)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream | None:
    if device.type != "cuda":
        return None
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
