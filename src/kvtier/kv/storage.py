"""Where KV bytes live: per storage target, a K tensor and a V tensor in a memory tier each.

Layout: ``k, v: [L, num_slots, Hkv, block_size, D]``. A block of one layer is a contiguous
``[Hkv, block_size, D]`` slab, so a block can be copied to another tier (or read by an attention
kernel) without touching its neighbours. Memory tiers: ``device`` (the accelerator, or CPU memory on
a CPU-only machine), ``host`` (CPU memory, pinned when a GPU is present), ``disk`` (a memory-mapped
file in a chosen directory).

A storage also knows its format's three operations, so the cache above it is format-agnostic:
``write`` new tokens, ``decode`` attention over a plan's blocks, and ``dense`` K/V of a sequence's
blocks (a prefill chunk over a cached prefix). ``kv/hack_storage.py`` is the HACK-coded twin.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.errors import ConfigError
from kvtier.kernels.attention import DecodePlan, paged_decode_attention, write_kv
from kvtier.kernels.formats import HackFormat, kv_bytes
from kvtier.kv.placement import Target
from kvtier.utils.memory import empty_hugepage


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype  # K/V as the model hands them over (a float cache stores them in it)
    fmt: HackFormat | None = None  # a HACK-coded cache (block_size = fmt.pi)

    def __post_init__(self):
        assert self.fmt is None or self.block_size == self.fmt.pi, "a HACK block is one V partition"

    @property
    def part_bytes(self) -> int:
        """Bytes of the K (or the V) of one block over all layers (a HACK slab holds both: half of it)."""
        if self.fmt is not None:
            return self.block_bytes // 2
        return self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V (codes, scales, minima and sums for HACK)."""
        if self.fmt is not None:
            return self.num_layers * kv_bytes(self.fmt, self.num_kv_heads, self.head_dim).block
        return 2 * self.part_bytes

    @property
    def tail_bytes(self) -> int:
        """Bytes per running sequence outside the blocks: HACK's 16-bit V of the open block, all layers."""
        if self.fmt is None:
            return 0
        return self.num_layers * kv_bytes(self.fmt, self.num_kv_heads, self.head_dim).tail_per_sequence

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


def make_storages(layout: KVLayout, targets: list[Target], mems: dict[str, Memory]) -> list[KVStorage]:
    """One storage per target, in order. Targets whose K and V sit in the same memory (non-disk tiers of
    one device, equally pinned: ``device`` and ``host`` on a CPU-only machine) are slot ranges of one
    shared storage: decode attention then runs once over a table whose blocks are in several of them,
    with the arithmetic of a single target, so lossless placement is bit-exact there (two passes merged
    by log-sum-exp differ from one pass in the last bits, which int8 activations can turn into tokens)."""
    groups: dict = {}
    for i, t in enumerate(targets):
        groups.setdefault(_memory_key(t, mems, i), []).append(i)
    out: list = [None] * len(targets)
    for members in groups.values():
        ts = [targets[i] for i in members]
        if len(ts) == 1:
            out[members[0]] = KVStorage(layout, ts[0], mems)
            continue
        whole = KVStorage(layout, Target("+".join(t.name for t in ts), sum(t.num_slots for t in ts),
                                         ts[0].k_tier, ts[0].v_tier), mems)
        base = 0
        for i, t in zip(members, ts, strict=True):
            out[i] = KVStorage(layout, t, mems, (whole, base))
            base += t.num_slots
    return out


def _memory_key(target: Target, mems: dict[str, Memory], index: int):
    """Targets with equal keys can share one storage; a disk tier, or K and V apart, keeps its own."""
    kinds = {(mems[t].device, mems[t].pinned) for t in target.tiers}
    if len(kinds) > 1 or any(mems[t].tier == "disk" for t in target.tiers):
        return ("own", index)
    return kinds.pop()


class KVStorage:
    """The K and V blocks of one storage target (K and V may sit in different memory tiers).

    ``whole`` and ``base``: targets kept in the same memory share one storage (``make_storages``); this
    one is then slots ``base ..`` of ``whole``, and attention can run once over blocks of all of them."""

    def __init__(self, layout: KVLayout, target: Target, mems: dict[str, Memory],
                 part_of: tuple[KVStorage, int] | None = None):
        self.layout = layout
        self.target = target
        shape = (layout.num_layers, target.num_slots, layout.num_kv_heads, layout.block_size, layout.head_dim)
        if part_of is None:
            # empty, not zeros: pages are committed as blocks are used; new blocks are zeroed on allocation
            self.k = mems[target.k_tier].empty(shape, layout.dtype)
            self.v = mems[target.v_tier].empty(shape, layout.dtype)
            self.whole, self.base = self, 0
        else:
            self.whole, self.base = part_of
            self.k, self.v = (t[:, self.base: self.base + target.num_slots] for t in (self.whole.k, self.whole.v))
        assert self.k.shape == shape
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # views, made once

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def target_device(self) -> torch.device:
        """Where this target's attention runs and new tokens arrive: K's device."""
        return self.k.device

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_slots, Hkv, block_size, D]."""
        return self._layers[layer]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
              tails: torch.Tensor) -> None:
        """k, v [T, Hkv, D] into block ``slots`` [T] at ``offsets`` [T] (``tails``: HACK's, unused here)."""
        k_cache, v_cache = self._layers[layer]
        write_kv(k_cache, v_cache, k, v, slots, offsets)

    def decode(self, layer: int, q: torch.Tensor, plan: DecodePlan, scale: float, tails: torch.Tensor,
               block_lse: bool) -> tuple:
        """(out [B, Hq, D], lse [B, Hq], block lse [B, Hq, W] or None) over the plan's blocks."""
        k_cache, v_cache = self._layers[layer]
        res = paged_decode_attention(q, k_cache, v_cache, plan, scale, return_lse=True, block_lse=block_lse)
        return res[0], res[1], res[2] if block_lse else None

    def dense(self, layer: int, slots: torch.Tensor, tokens: int, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, tokens, D] of the blocks ``slots`` [n] in order, the last one holding the rest."""
        k_cache, v_cache = self._layers[layer]
        hkv, d = k_cache.shape[1], k_cache.shape[3]
        k, v = (c[slots.to(c.device)].transpose(0, 1).reshape(hkv, -1, d)[:, :tokens] for c in (k_cache, v_cache))
        return k, v

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
