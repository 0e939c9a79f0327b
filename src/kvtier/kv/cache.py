"""The paged KV cache as the model sees it: write the new K/V, attend over a step's batch.

A step's flat batch puts decode tokens first (one per sequence), then prefill chunks. Decode
attention runs batched over block tables; each prefill chunk attends to its sequence's cached
prefix plus itself, causally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier.kernels.attention import (
    DecodePlan,
    gather_sequence,
    paged_decode_attention,
    prefill_attention,
    write_kv,
)
from kvtier.kv.storage import KVStorage


@dataclass(slots=True)
class PrefillSpan:
    start_token: int  # first token of the chunk in the flat batch
    num_tokens: int
    start_pos: int  # tokens of this sequence already in the cache
    block_table: torch.Tensor  # [nb] blocks covering start_pos + num_tokens


@dataclass(slots=True)
class AttentionMetadata:
    blocks: torch.Tensor  # [T] block id of each new token
    offsets: torch.Tensor  # [T] slot of each new token in its block
    num_decode: int = 0
    decode_plan: DecodePlan | None = None
    prefills: list[PrefillSpan] = field(default_factory=list)


class PagedKVCache:
    def __init__(self, storage: KVStorage, scale: float):
        self.storage = storage
        self.scale = scale

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, Hq, D]
        k_cache, v_cache = self.storage.layer(layer)
        write_kv(k_cache, v_cache, k, v, meta.blocks, meta.offsets)
        nd = meta.num_decode
        if nd and not meta.prefills:
            return paged_decode_attention(q, k_cache, v_cache, meta.decode_plan, self.scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_plan, self.scale)
        for span in meta.prefills:
            s, e = span.start_token, span.start_token + span.num_tokens
            if span.start_pos == 0:
                kk, vv = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
            else:
                total = span.start_pos + span.num_tokens
                kk = gather_sequence(k_cache, span.block_table, total)
                vv = gather_sequence(v_cache, span.block_table, total)
            out[s:e] = prefill_attention(q[s:e], kk, vv, self.scale)
        return out
