"""A storage target whose blocks are HACK-coded (``kernels/hack.py``): the same interface as
``KVStorage`` (``layer``, ``write``, ``decode``, ``dense``, ``zero``, ``gather``, ``scatter``).

Per layer, ``blocks: [L, num_slots, Hkv, slab] uint8``: each (block, KV head) is one slab of K codes,
V codes and their scales, minima and code sums, so a block moves between tiers as one piece. The V
of each running sequence's open block waits, 16-bit, in its *tail slot* (``tails: [L, S, Hkv, pi, D]``,
one slot per running sequence, given by the scheduler) until its ``pi`` tokens are complete; the tails
live on the engine's device and are shared by every target (a block's tail belongs to its sequence,
not to the tier the block sits in).

Decode attention runs on the codes (HACK's four-term formula). A prefill chunk over a cached prefix
reads the prefix dequantized (``dense``): prefill is compute-bound and runs in full precision, as in
the paper, where the prefill instance quantizes only what it hands to decode.
"""

from __future__ import annotations

import torch

from kvtier.kernels.attention import DecodePlan
from kvtier.kernels.hack import HackCache, dequantize_kv, hack_decode_attention, hack_write, slab_offsets
from kvtier.kv.placement import Target
from kvtier.kv.storage import KVLayout, Memory


def unsupported(policy, trace: bool = False) -> str | None:
    """Why a HACK-coded cache cannot serve ``policy`` (a KVPolicy), or None when it can."""
    if policy.observes_attention or trace:
        return "its attention does not report the per-block mass that this policy or --trace needs"
    if policy.preemption == "swap":
        return "a swapped sequence would lose the 16-bit V of its open block"
    if hasattr(policy, "decode_attention"):
        return f"policy '{policy.name}' runs its own attention on float K/V"
    return None


def allocate_tails(layout: KVLayout, num_seqs: int, memory: Memory) -> torch.Tensor:
    """The V tails of ``num_seqs`` running sequences, all layers: [L, S, Hkv, pi, D] 16-bit, zeroed."""
    fmt = layout.fmt
    shape = (layout.num_layers, num_seqs, layout.num_kv_heads, fmt.pi, layout.head_dim)
    return memory.empty(shape, fmt.tail_dtype).zero_()


class HackStorage:
    def __init__(self, layout: KVLayout, target: Target, mems: dict[str, Memory], tails: torch.Tensor):
        assert layout.fmt is not None and target.k_tier == target.v_tier, "a HACK slab holds K and V together"
        self.layout = layout
        self.target = target
        self.whole, self.base = self, 0  # a HACK target never shares its storage (see ``make_storages``)
        slab = slab_offsets(layout.fmt, layout.head_dim)[-1]
        shape = (layout.num_layers, target.num_slots, layout.num_kv_heads, slab)
        self.blocks = mems[target.k_tier].empty(shape, torch.uint8)  # new blocks are zeroed on allocation
        self._layers = [HackCache(layout.fmt, b, t) for b, t in zip(self.blocks.unbind(0), tails.unbind(0),
                                                                     strict=True)]

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def nbytes(self) -> int:
        """The blocks' bytes (the shared tails are counted once, by the engine)."""
        return self.blocks.numel()

    @property
    def target_device(self) -> torch.device:
        return self.blocks.device

    def layer(self, layer: int) -> HackCache:
        return self._layers[layer]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
              tails: torch.Tensor) -> None:
        # k, v: [T, Hkv, D]; slots, offsets, tails: [T] (a sequence's tokens in order)
        hack_write(self._layers[layer], k, v, slots, offsets, tails)

    def decode(self, layer: int, q: torch.Tensor, plan: DecodePlan, scale: float, tails: torch.Tensor,
               block_lse: bool) -> tuple:
        assert not block_lse, "HACK attention does not report per-block mass (the engine refuses such policies)"
        out, lse = hack_decode_attention(q, self._layers[layer], plan, scale, tails)
        return out, lse, None

    def dense(self, layer: int, slots: torch.Tensor, tokens: int, tail: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, tokens, D] of blocks ``slots`` [n] in order, dequantized (V of an open last block
        from tail slot ``tail``)."""
        cache = self._layers[layer]
        dev = cache.blocks.device
        plan = DecodePlan(slots.to(dev)[None], torch.tensor([tokens], device=dev))
        k, v = dequantize_kv(cache, plan, torch.tensor([tail], device=dev))  # [1, Hkv, n * pi, D] float32
        return k[0, :, :tokens], v[0, :, :tokens]

    def zero(self, slots: torch.Tensor) -> None:
        self.blocks.index_fill_(1, slots.to(self.blocks.device), 0)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor]:
        """Copies of the slabs of ``slots`` (all layers): ([L, n, Hkv, slab],)."""
        return (self.blocks[:, slots.to(self.blocks.device)],)

    def scatter(self, slots: torch.Tensor, slabs: torch.Tensor) -> None:
        self.blocks[:, slots.to(self.blocks.device)] = slabs.to(self.blocks.device, non_blocking=True)
