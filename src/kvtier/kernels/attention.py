"""Paged attention over block tables: a compiled CPU fast path and a plain-torch reference.

Cache layout (one layer of one tier): ``k_cache, v_cache: [num_blocks, Hkv, block_size, D]``.
A sequence's tokens live in the blocks of its block table, in order; token ``t`` sits in block
``table[t // block_size]`` at offset ``t % block_size``. Kernels follow a plan/run split: the plan
(block tables, context lengths, index tensors) is built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.kernels import ext


def _fast(t: torch.Tensor):
    """The compiled module when ``t`` lives on the CPU and the build is available."""
    return ext.load() if t.device.type == "cpu" else None


def write_kv(
    k_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    v_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    k: torch.Tensor,  # [T, Hkv, D] the cache's dtype, or float32 (rounded as it is written)
    v: torch.Tensor,  # [T, Hkv, D]
    blocks: torch.Tensor,  # [T] block id of each new token
    offsets: torch.Tensor,  # [T] slot in its block
) -> None:
    fast = _fast(k_cache)
    if fast is not None:
        fast.write_kv(k_cache, v_cache, k, v, blocks, offsets)
    else:
        write_kv_reference(k_cache, v_cache, k, v, blocks, offsets)


def write_kv_reference(
    k_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    v_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    blocks: torch.Tensor,  # [T] block id of each new token
    offsets: torch.Tensor,  # [T] slot in its block
) -> None:
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    dev = v_cache.device  # V may sit in another tier than K (KCache: K on the GPU, V in host memory)
    v_cache[blocks.to(dev), :, offsets.to(dev)] = v.to(dev, v_cache.dtype)


@dataclass(slots=True)
class DecodePlan:
    """One decode step of B sequences, shared by all layers."""

    block_tables: torch.Tensor  # [B, W] int64 (padding entries may hold any valid block id)
    context_lens: torch.Tensor  # [B] int64, tokens to attend to, the new one included
    gather: torch.Tensor | None = None  # reference path: [B, Hkv, W] rows of the cache as [NB * Hkv, bs, D]
    invalid: torch.Tensor | None = None  # reference path: [B, 1, 1, W * bs] True past each context
    index_shape: tuple[int, int] | None = None  # (Hkv, bs) the two index tensors were built for

    def reference_index(self, num_kv_heads: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index_shape != (num_kv_heads, block_size):
            self.index_shape = (num_kv_heads, block_size)
            dev = self.block_tables.device
            heads = torch.arange(num_kv_heads, device=dev)
            self.gather = self.block_tables[:, None, :] * num_kv_heads + heads[None, :, None]
            pos = torch.arange(self.block_tables.shape[1] * block_size, device=dev)
            self.invalid = (pos[None, :] >= self.context_lens[:, None])[:, None, None, :]
        return self.gather, self.invalid


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D] one query per sequence
    k_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    v_cache: torch.Tensor,  # [NB, Hkv, bs, D]
    plan: DecodePlan,
    scale: float,
    return_lse: bool = False,
    block_lse: bool = False,
):
    """Softmax attention of each query over its sequence's cached keys: out [B, Hq, D].

    ``return_lse``: also the log-sum-exp of the scores, lse [B, Hq] float32, so partial results over
    disjoint key sets merge exactly (``merge_attention``): blocks in different memory tiers, or on
    different devices. ``block_lse``: also each block's log-sum-exp [B, Hq, W] (-inf past a
    context), so ``exp(block_lse - lse)`` is the attention mass each block received.
    """
    fast = _fast(q)
    if fast is not None:
        res = fast.paged_decode_attention(q, k_cache, v_cache, plan.block_tables, plan.context_lens, scale, 0,
                                          block_lse)
    else:
        res = paged_decode_attention_reference(q, k_cache, v_cache, plan, scale, block_lse)
    if block_lse:
        return tuple(res)
    return (res[0], res[1]) if return_lse else res[0]


def paged_decode_attention_reference(q, k_cache, v_cache, plan: DecodePlan, scale: float, block_lse: bool = False
                                     ) -> tuple[torch.Tensor, ...]:
    b, hq, d = q.shape
    nb, hkv, bs, _ = k_cache.shape
    gather, invalid = plan.reference_index(hkv, bs)
    t = gather.shape[-1] * bs
    k = k_cache.view(nb * hkv, bs, d)[gather].view(b, hkv, t, d).to(q.dtype)
    vg = gather.to(v_cache.device)  # V may sit in another memory than K (KCache's exempt layers read it all)
    v = v_cache.view(nb * hkv, bs, d)[vg].view(b, hkv, t, d).to(q.device, q.dtype)
    return gathered_decode_attention(q, k, v, invalid, scale, bs if block_lse else None)


def gathered_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k: torch.Tensor,  # [B, Hkv, T, D] each sequence's keys gathered in table order (T = W * bs)
    v: torch.Tensor,  # [B, Hkv, T, D]
    invalid: torch.Tensor,  # [B, 1, 1, T] True past each context
    scale: float,
    block_size: int | None = None,  # also each block's log-sum-exp
) -> tuple[torch.Tensor, ...]:  # out [B, Hq, D], lse [B, Hq] (, block lse [B, Hq, W])
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # [B, Hkv, G, D]
    s = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, T]
    s.masked_fill_(invalid, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # [B, Hkv, G]
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a sequence with no keys here: zeros, lse -inf
    out = torch.matmul(p, v).view(b, hq, d), lse.view(b, hq)
    if block_size is None:
        return out
    blocks = torch.logsumexp(s.float().view(b, hkv, hq // hkv, -1, block_size), dim=-1)  # [B, Hkv, G, W]
    return (*out, blocks.view(b, hq, -1))


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention computed over disjoint key sets: parts of (out [..., D], lse [...]).

    out = sum_i w_i out_i with w_i = exp(lse_i - lse), lse = log sum_i exp(lse_i). A part with no
    keys has lse = -inf and weight zero.
    """
    lses = torch.stack([lse.float() for _, lse in parts])  # [P, ...]
    total = torch.logsumexp(lses, dim=0)  # [...]
    w = torch.exp(lses - total).nan_to_num_(0.0).unsqueeze(-1)  # [P, ..., 1]; NaN where no part has keys
    out = sum(torch.where(w[i] > 0, w[i] * o.float(), 0.0) for i, (o, _) in enumerate(parts))
    return out.to(parts[0][0].dtype), total


def gather_sequence(
    cache: torch.Tensor,  # [NB, Hkv, bs, D]
    block_table: torch.Tensor,  # [nb] blocks of one sequence
    length: int,
) -> torch.Tensor:  # [Hkv, length, D]
    _, hkv, bs, d = cache.shape
    x = cache[block_table]  # [nb, Hkv, bs, D]
    return x.transpose(0, 1).reshape(hkv, -1, d)[:, :length]


def prefill_attention(
    q: torch.Tensor,  # [n, Hq, D] queries at positions start .. start+n-1
    k: torch.Tensor,  # [Hkv, start+n, D] all keys of the sequence up to the last query
    v: torch.Tensor,  # [Hkv, start+n, D]
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    n = q.shape[0]
    total = k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    if total == n:
        o = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True, scale=scale, enable_gqa=True)
    else:
        qpos = torch.arange(total - n, total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]  # [n, total]
        o = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)
