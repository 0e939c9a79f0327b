"""Where KV blocks live: one preallocated tensor per memory tier.

Layout: ``kv: [L, 2, num_blocks, Hkv, block_size, D]``. A block of one layer is a contiguous
``[Hkv, block_size, D]`` slab for K and one for V, so a block can be copied to another tier (or
read by an attention kernel) without touching its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.utils.memory import empty_hugepage


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes one block takes over all layers, K and V."""
        elems = 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim
        return elems * self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        return self.block_bytes // self.block_size


class KVStorage:
    """The K/V blocks of one memory tier."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str, tier: str = "device"):
        self.layout = layout
        self.num_blocks = num_blocks
        self.tier = tier
        shape = (layout.num_layers, 2, num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim)
        # empty, not zeros: pages are committed as blocks are used (huge pages where the OS offers
        # them: blocks are read scattered); new blocks are zeroed on allocation
        self.kv = empty_hugepage(shape, layout.dtype, device)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each [num_blocks, Hkv, block_size, D]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    def zero_blocks(self, block_ids: torch.Tensor) -> None:
        """Clear freshly allocated blocks so attention never reads stale bits past a context."""
        self.kv[:, :, block_ids] = 0
