"""Where KV bytes live: per storage target, a K tensor and a V tensor in a memory tier each.

Layout: ``k, v: [L, num_slots, Hkv, block_size, D]``. A block of one layer is a contiguous
``[Hkv, block_size, D]`` slab, so a block can be copied to another tier (or read by an attention
kernel) without touching its neighbours. Memory tiers: ``device`` (the accelerator, or CPU memory on
a CPU-only machine), ``host`` (CPU memory, pinned when a GPU is present), ``disk`` (a memory-mapped
file in a chosen directory).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.errors import ConfigError
from kvtier.kv.placement import Target
from kvtier.utils.memory import empty_hugepage


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def part_bytes(self) -> int:
        """Bytes of the K (or the V) of one block over all layers."""
        return self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V."""
        return 2 * self.part_bytes

    @property
    def token_bytes(self) -> int:
        return self.block_bytes // self.block_size


@dataclass(frozen=True, slots=True)
class Memory:
    """How to allocate tensors of one memory tier."""

    tier: str
    device: torch.device
    pinned: bool = False
    disk_dir: Path | None = None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.tier == "disk":
            return _file_tensor(self.disk_dir, shape, dtype)
        if self.pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return empty_hugepage(shape, dtype, self.device)


def memories(device: torch.device, disk_dir: str | Path | None) -> dict[str, Memory]:
    """The memory tiers of this machine."""
    cpu = torch.device("cpu")
    gpu = device.type == "cuda"
    return {
        "device": Memory("device", device),
        "host": Memory("host", cpu, pinned=gpu),
        "disk": Memory("disk", cpu, disk_dir=Path(disk_dir) if disk_dir else None),
    }


def check_disk_dir(path: str | Path | None) -> Path:
    """The directory for the disk tier, checked writable now rather than failing mid-run."""
    if path is None:
        raise ConfigError("the disk tier needs a directory", "pass --kv-disk-dir DIR")
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write the disk tier's file in {p}: {e.strerror or e}",
                          "pass --kv-disk-dir with a writable directory") from e
    return p


def _file_tensor(directory: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    fd, name = tempfile.mkstemp(prefix="kvtier-kv-", suffix=".bin", dir=directory)
    os.close(fd)
    try:
        numel = 1
        for s in shape:
            numel *= s
        t = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.unlink(name)  # the mapping stays valid; the file goes away with the process
    return t


class KVStorage:
    """The K and V blocks of one storage target (K and V may sit in different memory tiers)."""

    def __init__(self, layout: KVLayout, target: Target, mems: dict[str, Memory]):
        self.layout = layout
        self.target = target
        shape = (layout.num_layers, target.num_slots, layout.num_kv_heads, layout.block_size, layout.head_dim)
        # empty, not zeros: pages are committed as blocks are used; new blocks are zeroed on allocation
        self.k = mems[target.k_tier].empty(shape, layout.dtype)
        self.v = mems[target.v_tier].empty(shape, layout.dtype)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # views, made once

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_slots, Hkv, block_size, D]."""
        return self._layers[layer]

    def zero(self, slots: torch.Tensor) -> None:
        """Clear freshly allocated slots so attention never reads stale bits past a context."""
        self.k.index_fill_(1, slots.to(self.k.device), 0)
        self.v.index_fill_(1, slots.to(self.v.device), 0)  # V may sit in another tier (KCache)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V of ``slots`` (all layers), each [L, n, Hkv, block_size, D]."""
        idx = slots.to(self.k.device)
        return self.k[:, idx], self.v[:, idx]

    def scatter(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write gathered blocks into ``slots`` (all layers)."""
        idx = slots.to(self.k.device)
        self.k[:, idx] = k.to(self.k.device, non_blocking=True)
        self.v[:, idx] = v.to(self.v.device, non_blocking=True)
