"""HACK (arXiv 2502.03589): a 2/4/8-bit KV cache whose decode attention runs on the codes.

Quantization: asymmetric min-max per partition of ``pi`` elements (default 64), ``x ~ s * q + m``
with codes ``q`` in ``[0, 2**bits - 1]``, round to nearest (ties to even; the paper uses stochastic
rounding), scale and minimum stored in float16 (codes are computed against the stored, rounded
values, so a round trip errs by at most half a step plus the float16 rounding of the minimum).
K is partitioned along head_dim, V along the sequence. Q and the softmax output P are quantized to
8 bits on the fly (float32 scale/minimum, not stored), and Q.K^T and P.V are computed on the codes,
per partition of the shared dimension, with the four-term formula (:func:`four_term`)::

    (AB)_ij = s_A s_B sum A'B' + s_A m_B sum A' + m_A s_B sum B' + pi m_A m_B

The code sums of K and V (``sum B'``) are stored beside the codes; the V of a sequence's open block
stays 16-bit in a per-sequence tail until its ``pi`` tokens are complete, then is quantized once.
No dequantized copy of K or V is made (the reference unpacks codes, never ``s * q + m``).

Paged layout of one layer (a HACK cache's block size is ``pi``: one V partition = one block),
``P = D / pi`` K partitions per head, ``R = pi * bits / 8`` bytes per packed row of ``pi`` codes.
``blocks [NB, Hkv, slab] uint8`` holds each (block, KV head) as one contiguous slab (one memory
stream per block for the kernel, one piece to move between tiers), whose parts, in this order, are
viewed as (``HackCache.k_codes`` etc., each [NB, Hkv, ...]):

    k_codes [P, pi * R] uint8     per partition, the pi tokens x pi elements matrix, packed
    k_scale, k_min [P, pi] f16    per (token, partition);   k_sum [P, pi] int16
    v_codes [D * R] uint8         the D channels x pi tokens matrix (the V partition), packed
    v_scale, v_min [D] f16        per (block, channel);     v_sum [D] int16
    v_tail [S, Hkv, pi, D] f16/bf16  (a tensor of its own) per sequence slot: V of the open block, rows
                                     [0, ctx % pi)

Packing ("pair-vertical", what a SIMD dot product on codes wants): codes form matrices of ``rows``
x ``n`` (K: per block and partition, pi tokens x pi elements of head_dim; V: per block, D channels x
pi tokens; the dot products run along n). Rows go in groups of 16; a group is a run of 32-byte
chunks, chunk k holding, in byte ``2 * r + e``, the codes of row r at positions ``2 * (c * k + s) + e``
in bits ``[s * bits, (s + 1) * bits)``, ``c = 8 / bits`` slots. A shift and a mask give the 16 rows'
codes at one pair of positions, ready for an 8-bit multiply-add, and every byte belongs to one row,
so one token's K is written without touching its neighbours'.

A sequence of ``n`` cached tokens uses ``ceil(n / pi)`` blocks of its block table: K codes of all
n tokens, V codes of the ``n // pi`` full blocks, V of the rest in its tail slot. Decode attention
returns ``(out, lse)`` like the float kernel, so results over tiers merge by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvtier.kernels import ext
from kvtier.kernels.attention import DecodePlan
from kvtier.kernels.formats import META_DTYPE, SUM_DTYPE, HackFormat

_MODULE = "hack"


def _fast(t: torch.Tensor):
    """The compiled module when ``t`` lives on the CPU and the build is available."""
    return ext.load(_MODULE) if t.device.type == "cpu" else None


# ---- quantization primitives --------------------------------------------------------------------


class Quantized(NamedTuple):
    codes: torch.Tensor  # [..., n] uint8, unpacked
    scale: torch.Tensor  # [...]
    minimum: torch.Tensor  # [...]
    sums: torch.Tensor  # [...] int32, sum of the codes


def quantize(x: torch.Tensor, bits: int, meta_dtype: torch.dtype | None = META_DTYPE) -> Quantized:
    """Min-max quantize along the last dim; meta rounded to ``meta_dtype`` (None: keep float32)."""
    x = x.float()
    qmax = 2**bits - 1
    mn, mx = x.amin(-1), x.amax(-1)
    s = (mx - mn) / qmax
    if meta_dtype is not None:
        s, mn = s.to(meta_dtype).float(), mn.to(meta_dtype).float()
    div = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((x - mn[..., None]) / div[..., None]).clamp_(0, qmax).to(torch.uint8)
    meta = meta_dtype or torch.float32
    return Quantized(codes, s.to(meta), mn.to(meta), codes.sum(-1, dtype=torch.int32))


def dequantize(q: Quantized) -> torch.Tensor:
    return q.codes.float() * q.scale.float()[..., None] + q.minimum.float()[..., None]


def pack_matrix(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., rows, n] codes -> [..., rows * n * bits / 8] bytes in the pair-vertical layout (module docstring)."""
    *lead, rows, n = codes.shape
    c, dims = 8 // bits, len(lead)
    assert rows % 16 == 0 and n % (2 * c) == 0
    x = codes.reshape(*lead, rows // 16, 16, n // (2 * c), c, 2).to(torch.int32)  # [.., RG, r, k, s, e]
    x = x.permute(*range(dims), dims, dims + 2, dims + 1, dims + 4, dims + 3)  # [.., RG, k, r, e, s]
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (x << shifts).sum(-1).to(torch.uint8).reshape(*lead, -1)


def unpack_matrix(packed: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    """[..., rows * n * bits / 8] bytes -> [..., rows, n] codes (inverse of :func:`pack_matrix`)."""
    *lead, nbytes = packed.shape
    dims = len(lead)
    x = packed.reshape(*lead, rows // 16, -1, 16, 2)  # [.., RG, k, r, e]
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    x = (x[..., None] >> shifts) & (2**bits - 1)  # [.., RG, k, r, e, s]
    x = x.permute(*range(dims), dims, dims + 2, dims + 1, dims + 4, dims + 3)  # [.., RG, r, k, s, e]
    return x.reshape(*lead, rows, nbytes * 8 // bits // rows)


def pack_row(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """One row's bytes of the pair-vertical layout: [..., n] codes -> [..., n * bits / 8], chunk-major."""
    c = 8 // bits
    x = codes.reshape(*codes.shape[:-1], -1, c, 2).to(torch.int32).transpose(-1, -2)  # [.., k, e, s]
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.int32)
    return (x << shifts).sum(-1).to(torch.uint8).flatten(-2)


def row_positions(rows: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Where :func:`pack_row`'s bytes of matrix rows ``rows [T]`` go: [T, n * bits / 8] byte offsets."""
    chunks = n * bits // 16  # 32-byte chunks per group of 16 rows
    k = torch.arange(chunks, device=rows.device)[:, None]
    e = torch.arange(2, device=rows.device)[None, :]
    base = (rows // 16 * chunks)[:, None, None] + k  # [T, k, 1]
    return (base * 32 + 2 * (rows % 16)[:, None, None] + e).flatten(1)


def four_term(dot, a_scale, a_min, a_sum, b_scale, b_min, b_sum, pi: int) -> torch.Tensor:
    """sum_k A_ik B_kj over one partition from the codes: ``dot`` = sum A'B' (exact), broadcasting."""
    return a_scale * b_scale * dot + a_scale * b_min * a_sum + a_min * b_scale * b_sum + pi * a_min * b_min


# ---- the cache ----------------------------------------------------------------------------------


# one block-head's slab: (role, dtype, shape after [NB, Hkv]) in memory order; P = D / pi, R = pi * bits / 8
def _slab_parts(fmt: HackFormat, d: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    parts, pi = fmt.check_head_dim(d), fmt.pi
    return [("k_codes", torch.uint8, (parts, pi * fmt.row_bytes)), ("k_scale", META_DTYPE, (parts, pi)),
            ("k_min", META_DTYPE, (parts, pi)), ("k_sum", SUM_DTYPE, (parts, pi)),
            ("v_codes", torch.uint8, (d * fmt.row_bytes,)), ("v_scale", META_DTYPE, (d,)), ("v_min", META_DTYPE, (d,)),
            ("v_sum", SUM_DTYPE, (d,))]


def slab_offsets(fmt: HackFormat, d: int) -> list[int]:
    """Byte offset of each part in a block-head's slab, then the slab size (all even: 16-bit aligned)."""
    offsets = [0]
    for _, dtype, shape in _slab_parts(fmt, d):
        offsets.append(offsets[-1] + math.prod(shape) * dtype.itemsize)
    return offsets


@dataclass(slots=True)
class HackCache:
    """One layer's HACK KV cache: each (block, KV head) is one contiguous slab of codes and meta, so a
    block moves between tiers as one piece; the parts are views (shapes in the module docstring)."""

    fmt: HackFormat
    blocks: torch.Tensor  # [NB, Hkv, slab] uint8
    v_tail: torch.Tensor  # [S, Hkv, pi, D] 16-bit: V of each sequence slot's open block
    offsets: list[int] = field(init=False)  # slab_offsets(fmt, D)

    def __post_init__(self):
        self.offsets = slab_offsets(self.fmt, self.head_dim)
        assert self.blocks.dtype == torch.uint8 and self.blocks.shape[2] == self.offsets[-1], "slabs do not fit"

    @classmethod
    def allocate(cls, fmt: HackFormat, num_blocks: int, num_kv_heads: int, head_dim: int, num_slots: int,
                 device: torch.device | str = "cpu", empty=torch.empty) -> HackCache:
        """Zeroed tensors from ``empty(shape, dtype=, device=)`` (e.g. a huge-page allocator)."""
        slab = slab_offsets(fmt, head_dim)[-1]
        blocks = empty((num_blocks, num_kv_heads, slab), dtype=torch.uint8, device=device).zero_()
        tail = empty((num_slots, num_kv_heads, fmt.pi, head_dim), dtype=fmt.tail_dtype, device=device).zero_()
        return cls(fmt, blocks, tail)

    @property
    def num_kv_heads(self) -> int:
        return self.blocks.shape[1]

    @property
    def head_dim(self) -> int:
        return self.v_tail.shape[-1]

    def part(self, role: str) -> torch.Tensor:
        """A view of one part of every slab: [NB, Hkv, *shape] in its dtype."""
        parts = _slab_parts(self.fmt, self.head_dim)
        i = [name for name, _, _ in parts].index(role)
        lo, hi = self.offsets[i : i + 2]
        _, dtype, shape = parts[i]
        return self.blocks[:, :, lo:hi].view(dtype).view(*self.blocks.shape[:2], *shape)

    k_codes = property(lambda self: self.part("k_codes"))
    k_scale = property(lambda self: self.part("k_scale"))
    k_min = property(lambda self: self.part("k_min"))
    k_sum = property(lambda self: self.part("k_sum"))
    v_codes = property(lambda self: self.part("v_codes"))
    v_scale = property(lambda self: self.part("v_scale"))
    v_min = property(lambda self: self.part("v_min"))
    v_sum = property(lambda self: self.part("v_sum"))

    def kernel_args(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """What the compiled module takes: the slabs, the tails, the slab offsets."""
        return self.blocks, self.v_tail, self.offsets


# ---- writing new tokens -------------------------------------------------------------------------


def hack_write(
    cache: HackCache,
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    blocks: torch.Tensor,  # [T] int64 block of each token
    offsets: torch.Tensor,  # [T] int64 slot in its block (position % pi)
    slots: torch.Tensor,  # [T] int64 tail slot of each token's sequence
) -> None:
    """Quantize K per token; append V to its sequence's tail and quantize each block that fills.

    A sequence's tokens must come in order (as the engine writes them); V is rounded to the tail
    dtype first, whether or not it passes through the tail.
    """
    fast = _fast(k)
    if fast is not None:
        fast.hack_write(*cache.kernel_args(), k, v, blocks, offsets, slots, cache.fmt.bits)
    else:
        hack_write_reference(cache, k, v, blocks, offsets, slots)


def hack_write_reference(cache: HackCache, k, v, blocks, offsets, slots) -> None:
    fmt = cache.fmt
    t, hkv, d = k.shape
    parts = d // fmt.pi
    kq = quantize(k.reshape(t, hkv, parts, fmt.pi), fmt.bits)
    heads = torch.arange(hkv, device=k.device)[None, :, None, None]
    part = torch.arange(parts, device=k.device)[None, None, :, None]
    where = row_positions(offsets, fmt.pi, fmt.bits)[:, None, None, :]  # token = row of each partition's matrix
    cache.k_codes[blocks[:, None, None, None], heads, part, where] = pack_row(kq.codes, fmt.bits)
    cache.k_scale[blocks, :, :, offsets] = kq.scale
    cache.k_min[blocks, :, :, offsets] = kq.minimum
    cache.k_sum[blocks, :, :, offsets] = kq.sums.to(SUM_DTYPE)
    v16 = v.to(fmt.tail_dtype)
    for slot, block, lo, hi, off0 in _runs(blocks, offsets, slots):
        cache.v_tail[slot, :, off0 : off0 + hi - lo] = v16[lo:hi].transpose(0, 1)
        if off0 + hi - lo == fmt.pi:
            _quantize_v_block(cache, block, cache.v_tail[slot])


def _runs(blocks, offsets, slots):
    """Runs of consecutive tokens of one sequence in one block: (slot, block, lo, hi, first offset)."""
    b, o, s = blocks.tolist(), offsets.tolist(), slots.tolist()
    lo = 0
    for i in range(1, len(b) + 1):
        if i == len(b) or (s[i], b[i], o[i]) != (s[lo], b[lo], o[lo] + i - lo):
            yield s[lo], b[lo], lo, i, o[lo]
            lo = i


def _quantize_v_block(cache: HackCache, block: int, v: torch.Tensor) -> None:
    # v: [Hkv, pi, D] -> per (head, channel) over the pi tokens
    q = quantize(v.transpose(1, 2), cache.fmt.bits)
    cache.v_codes[block] = pack_matrix(q.codes, cache.fmt.bits)
    cache.v_scale[block], cache.v_min[block], cache.v_sum[block] = q.scale, q.minimum, q.sums.to(SUM_DTYPE)


# ---- decode attention ---------------------------------------------------------------------------


def _slots(tail_slots: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    return torch.arange(batch, device=device) if tail_slots is None else tail_slots


def hack_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    cache: HackCache,
    plan: DecodePlan,  # block tables over HACK blocks of pi tokens; context_lens include the new token
    scale: float,
    tail_slots: torch.Tensor | None = None,  # [B] int64 tail slot of each sequence (default: b)
) -> tuple[torch.Tensor, torch.Tensor]:  # out [B, Hq, D] in q's dtype, lse [B, Hq] float32
    fast = _fast(q)
    slots = _slots(tail_slots, q.shape[0], q.device)
    if fast is not None:
        out, lse = fast.hack_decode_attention(q, *cache.kernel_args(), plan.block_tables, plan.context_lens, slots,
                                              scale, cache.fmt.bits, 0)
        return out, lse
    return hack_decode_attention_reference(q, cache, plan, scale, slots)


def hack_decode_attention_reference(q, cache: HackCache, plan: DecodePlan, scale: float,
                                    tail_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, d = q.shape
    hkv, pi = cache.num_kv_heads, cache.fmt.pi
    qq = quantize((q.float() * scale).view(b, hkv, hq // hkv, d // pi, pi), 8, meta_dtype=None)
    s = _scores(qq, cache, plan)  # [B, Hkv, G, T]
    lse = torch.logsumexp(s, -1)  # [B, Hkv, G]
    p = torch.exp(s - lse[..., None])
    out = _pv_full_blocks(p, cache, plan) + _pv_tail(p, cache, plan, _slots(tail_slots, b, q.device))
    return out.view(b, hq, d).to(q.dtype), lse.view(b, hq)


def _scores(qq: Quantized, cache: HackCache, plan: DecodePlan) -> torch.Tensor:
    """Q.K^T / sqrt(d) from codes, -inf past each context: [B, Hkv, G, T]."""
    fmt, tables = cache.fmt, plan.block_tables
    b, hkv, g, parts, pi = qq.codes.shape
    w = tables.shape[1]
    kc = unpack_matrix(cache.k_codes[tables], pi, fmt.bits)  # [B, W, Hkv, P, pi tokens, pi]
    kc = kc.permute(0, 2, 1, 4, 3, 5).reshape(b, hkv, w * pi, parts, pi).float()
    dot = torch.einsum("bhgpi,bhtpi->bhgtp", qq.codes.float(), kc)  # exact in float32: < 2**24
    meta = lambda x: x[tables].permute(0, 2, 1, 4, 3).reshape(b, hkv, 1, w * pi, parts).float()  # [B,Hkv,1,T,P]
    qm = lambda x: x.float()[:, :, :, None, :]  # [B, Hkv, G, 1, P]
    s = four_term(dot, qm(qq.scale), qm(qq.minimum), qm(qq.sums), meta(cache.k_scale), meta(cache.k_min),
                  meta(cache.k_sum), pi).sum(-1)
    valid = torch.arange(w * pi, device=s.device) < plan.context_lens[:, None]  # [B, T]
    return s.masked_fill(~valid[:, None, None, :], float("-inf"))


def _pv_full_blocks(p: torch.Tensor, cache: HackCache, plan: DecodePlan) -> torch.Tensor:
    """P.V over each sequence's full blocks, P quantized to 8 bits per block: [B, Hkv, G, D]."""
    fmt, tables = cache.fmt, plan.block_tables
    b, hkv, g, _ = p.shape
    w = tables.shape[1]
    pq = quantize(p.view(b, hkv, g, w, fmt.pi), 8, meta_dtype=None)  # per (head, block)
    vc = unpack_matrix(cache.v_codes[tables], cache.head_dim, fmt.bits).float()  # [B, W, Hkv, D, pi]
    dot = torch.einsum("bhgwi,bwhdi->bhgwd", pq.codes.float(), vc)
    meta = lambda x: x[tables].permute(0, 2, 1, 3)[:, :, None].float()  # [B, Hkv, 1, W, D]
    pm = lambda x: x.float()[..., None]  # [B, Hkv, G, W, 1]
    pv = four_term(dot, pm(pq.scale), pm(pq.minimum), pm(pq.sums), meta(cache.v_scale), meta(cache.v_min),
                   meta(cache.v_sum), fmt.pi)
    full = torch.arange(w, device=p.device) < (plan.context_lens // fmt.pi)[:, None]  # [B, W]
    return torch.where(full[:, None, None, :, None], pv, 0.0).sum(3)


def _pv_tail(p: torch.Tensor, cache: HackCache, plan: DecodePlan, slots: torch.Tensor) -> torch.Tensor:
    """P.V over each open block, V from the 16-bit tail: [B, Hkv, G, D]."""
    b, hkv, g, t = p.shape
    pi = cache.fmt.pi
    start = (plan.context_lens // pi) * pi  # [B]
    local = torch.arange(pi, device=p.device)
    idx = (start[:, None] + local).clamp(max=t - 1)  # [B, pi]
    pt = p.gather(-1, idx[:, None, None, :].expand(b, hkv, g, pi))
    pt = torch.where((local < (plan.context_lens - start)[:, None])[:, None, None, :], pt, 0.0)
    return pt @ cache.v_tail[slots].float()  # [B, Hkv, G, pi] @ [B, Hkv, pi, D]


# ---- the baseline: dequantize, then dense attention (HF transformers' QuantizedCache) -------------


def dequantize_kv(cache: HackCache, plan: DecodePlan, tail_slots: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K, V [B, Hkv, W * pi, D] of the batch (V from the tail past the full blocks, 0 past ctx)."""
    fmt, tables = cache.fmt, plan.block_tables
    b, w = tables.shape
    hkv, d, pi = cache.num_kv_heads, cache.head_dim, fmt.pi
    kc = unpack_matrix(cache.k_codes[tables], pi, fmt.bits)  # [B, W, Hkv, P, pi tokens, pi]
    k = dequantize(Quantized(kc, cache.k_scale[tables], cache.k_min[tables], cache.k_sum[tables]))
    k = k.permute(0, 2, 1, 4, 3, 5).reshape(b, hkv, w * pi, d)
    vc = unpack_matrix(cache.v_codes[tables], d, fmt.bits)  # [B, W, Hkv, D, pi]
    v = dequantize(Quantized(vc, cache.v_scale[tables], cache.v_min[tables], cache.v_sum[tables]))
    v = v.permute(0, 2, 1, 4, 3).reshape(b, hkv, w * pi, d)
    pos = torch.arange(w * pi, device=v.device)
    nfull = (plan.context_lens // pi) * pi
    tail_rows = cache.v_tail[_slots(tail_slots, b, v.device)].float()  # [B, Hkv, pi, D]
    tail_idx = (pos[None, :] - nfull[:, None]).clamp(0, pi - 1)  # [B, T]
    tail = tail_rows.gather(2, tail_idx[:, None, :, None].expand(b, hkv, w * pi, d))
    v = torch.where((pos[None, :] >= nfull[:, None])[:, None, :, None], tail, v)
    valid = (pos[None, :] < plan.context_lens[:, None])[:, None, :, None]
    return torch.where(valid, k, 0.0).to(dtype), torch.where(valid, v, 0.0).to(dtype)


def dequantize_then_attention(q: torch.Tensor, cache: HackCache, plan: DecodePlan, scale: float,
                              tail_slots: torch.Tensor | None = None) -> torch.Tensor:  # [B, Hq, D]
    """Dequantize the whole batch's K and V, then torch SDPA over them with a length mask."""
    k, v = dequantize_kv(cache, plan, tail_slots, q.dtype)
    valid = torch.arange(k.shape[2], device=q.device) < plan.context_lens[:, None]  # [B, T]
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                       enable_gqa=True)
    return o[:, :, 0]
