"""HACK: quantization round trips, the four-term formula, cache writes, and attention on the codes.

Error bounds, for one query head (q pre-scaled by 1/sqrt(D)), with K^, V^ the dequantized cache:

- Q is 8-bit per partition: |q - q^| <= s_q / 2, so a score errs by delta_t <= sum_p s_q,p / 2 * |k^_t,p|_1
  and softmax(s^) = p' satisfies |p'_t - p_t| <= p_t (exp(2 delta) - 1), delta = max_t delta_t.
- P is 8-bit per full block j: |p^_t - p'_t| <= s_P,j / 2 <= max_{t in j} p'_t / 510, so
  |out'_d - sum_t p'_t v^_t,d| <= P_BOUND_d = sum_j max_{t in j} p'_t / 510 * sum_{t in j} |v^_t,d|.
- Against dense attention over K^, V^ with the float q ("dequantize then dense"):
  |out_d - dense_d| <= (exp(2 delta) - 1) max_t |v^_t,d| + exp(2 delta) P_BOUND_d (p' <= p exp(2 delta)).

Each also gets 2e-5 of float32 slack. The compiled path quantizes exp(s - running max) per block, which
the min-max codes do not see (they are scale-free), so it obeys the same bounds; it and the reference
may round a P code differently, hence a looser tolerance between them than between their inputs.
"""

import pytest
import torch

from kvtier.kernels import ext, hack
from kvtier.kernels.attention import DecodePlan, merge_attention, paged_decode_attention
from kvtier.kernels.formats import HackFormat
from kvtier.kernels.hack import (
    HackCache,
    dequantize,
    dequantize_kv,
    dequantize_then_attention,
    four_term,
    hack_decode_attention,
    hack_decode_attention_reference,
    hack_write,
    hack_write_reference,
    pack_matrix,
    pack_row,
    quantize,
    row_positions,
    unpack_matrix,
)

fast = ext.load("hack")
needs_fast = pytest.mark.skipif(fast is None, reason="compiled HACK kernels unavailable here")
ISAS = fast.isas() if fast is not None else ["generic"]


# ---- quantization -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 32), (2, 128)])
def test_round_trip_within_one_step(bits, shape):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=g) * 3 + 1
    x[0] = 0.25  # a constant partition: scale 0, exact
    q = quantize(x, bits)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert torch.equal(q.sums, q.codes.sum(-1, dtype=torch.int32))
    err = (dequantize(q) - x).abs()
    step = q.scale.float()[..., None]
    assert (err <= step).all()  # within one step...
    assert (err <= step / 2 + 2e-3 * x.abs().amax(-1, keepdim=True)).all()  # ...half a step, up to fp16 meta


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows,n", [(16, 16), (64, 64), (128, 64), (32, 128)])
def test_pair_vertical_packing(bits, rows, n):
    """Matrices round-trip; rows written one by one (as K tokens are) give the whole matrix's bytes."""
    x = torch.randint(0, 2**bits, (3, rows, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_matrix(x, bits)
    assert packed.shape == (3, rows * n * bits // 8)
    assert torch.equal(unpack_matrix(packed, rows, bits), x)
    by_rows = torch.zeros_like(packed)
    by_rows[:, row_positions(torch.arange(rows), n, bits)] = pack_row(x, bits)
    assert torch.equal(by_rows, packed)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_four_term_formula_on_codes(bits):
    """sum_k A_ik B_kj from the codes equals the float64 product of the dequantized operands."""
    g = torch.Generator().manual_seed(0)
    pi = 64
    a = torch.randn(6, 2, pi, generator=g)  # 6 rows, 2 partitions of the shared dimension
    b = torch.randn(9, 2, pi, generator=g) * 2 + 0.5  # 9 columns, stored per (column, partition)
    qa, qb = quantize(a, 8, meta_dtype=None), quantize(b, bits)
    dot = torch.einsum("ipk,jpk->ijp", qa.codes.double(), qb.codes.double())  # float64: the terms cancel
    got = four_term(dot, qa.scale.double()[:, None], qa.minimum.double()[:, None], qa.sums.double()[:, None],
                    qb.scale.double()[None], qb.minimum.double()[None], qb.sums.double()[None], pi).sum(-1)
    deq = lambda q: q.codes.double() * q.scale.double()[..., None] + q.minimum.double()[..., None]
    want = torch.einsum("ipk,jpk->ij", deq(qa), deq(qb))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ---- cache writes -------------------------------------------------------------------------------


def build_cache(fmt, hkv, d, lens, writer, dtype=torch.float32, seed=0):
    """Sequences of `lens` tokens written in interleaved chunks (1 token, across blocks, whole blocks)."""
    g = torch.Generator().manual_seed(seed)
    pi, batch = fmt.pi, len(lens)
    width = max(-(-n // pi) for n in lens)
    nb = batch * width + 2
    cache = HackCache.allocate(fmt, nb, hkv, d, batch + 1)
    tables = torch.randperm(nb, generator=g)[: batch * width].view(batch, width)
    slots = torch.randperm(batch + 1, generator=g)[:batch]
    kv = [(torch.randn(n, hkv, d, generator=g).to(dtype), torch.randn(n, hkv, d, generator=g).to(dtype)) for n in lens]
    pos, step = [0] * batch, 0
    while any(p < n for p, n in zip(pos, lens, strict=True)):
        parts = []
        for b in range(batch):
            n = min(lens[b] - pos[b], [1, 37, 64, 150][(step + b) % 4])
            if n > 0:
                p = torch.arange(pos[b], pos[b] + n)
                parts.append((kv[b][0][p], kv[b][1][p], tables[b][p // pi], p % pi, torch.full((n,), int(slots[b]))))
                pos[b] += n
        writer(cache, *(torch.cat(x) for x in zip(*parts, strict=True)))
        step += 1
    return cache, DecodePlan(tables, torch.tensor(lens)), slots, kv


_BUILT = {}


def reference_cache(fmt, hkv, d, lens):
    """build_cache with the reference writer, built once per test session (attention only reads it)."""
    key = (fmt, hkv, d, tuple(lens))
    if key not in _BUILT:
        _BUILT[key] = build_cache(fmt, hkv, d, lens, hack_write_reference)
    return _BUILT[key]


def tail_rows(cache, plan, slots):
    pi = cache.fmt.pi
    return [cache.v_tail[s, :, : int(n) % pi] for s, n in zip(slots.tolist(), plan.context_lens, strict=True)]


@needs_fast
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pi,d", [(64, 64), (64, 128), (32, 64), (16, 32)])
def test_compiled_write_matches_reference(bits, pi, d):
    fmt, lens = HackFormat(bits=bits, pi=pi), [1, 200, 64, 129, 300]
    ref, plan, slots, _ = build_cache(fmt, 3, d, lens, hack_write_reference)
    got, _, _, _ = build_cache(fmt, 3, d, lens, lambda c, *a: fast.hack_write(*c.kernel_args(), *a, bits))
    for name in ("k_codes", "k_scale", "k_min", "k_sum", "v_codes", "v_scale", "v_min", "v_sum"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name  # bit-identical quantization
    for a, b in zip(tail_rows(got, plan, slots), tail_rows(ref, plan, slots), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_dequantizes_to_what_was_written(kernel_path, bits, dtype):
    fmt, lens = HackFormat(bits=bits, tail_dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float16), [130, 5]
    cache, plan, slots, kv = build_cache(fmt, 2, 128, lens, hack_write, dtype)
    k, v = dequantize_kv(cache, plan, slots)  # [B, Hkv, T, D]
    qmax = 2**bits - 1
    for b, (kk, vv) in enumerate(kv):
        n, x = lens[b], kk.float().transpose(0, 1)  # [Hkv, n, D]
        step = (x.view(2, n, 2, 64).amax(-1) - x.view(2, n, 2, 64).amin(-1)) / qmax  # per token partition
        assert ((k[b, :, :n].view(2, n, 2, 64) - x.view(2, n, 2, 64)).abs() <= step[..., None] * 1.01 + 1e-3).all()
        full = n // 64 * 64
        y = vv.to(fmt.tail_dtype).float().transpose(0, 1)  # V passes through the 16-bit tail
        if full:
            blocks = y[:, :full].reshape(2, -1, 64, 128)
            vstep = (blocks.amax(2) - blocks.amin(2)) / qmax  # per (block, channel)
            verr = (v[b, :, :full].reshape(2, -1, 64, 128) - blocks).abs()
            assert (verr <= vstep[:, :, None] * 1.01 + 1e-3).all()
        assert torch.equal(v[b, :, full:n], y[:, full:])  # the open block: 16-bit, exact


@needs_fast
def test_compiled_write_rejects_out_of_order_tokens():
    cache = HackCache.allocate(HackFormat(), 4, 1, 64, 1)
    k = torch.randn(3, 1, 64)
    with pytest.raises(RuntimeError, match="in order"):  # block 0 is not complete when block 1 starts
        fast.hack_write(*cache.kernel_args(), k, k, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]),
                        torch.zeros(3, dtype=torch.long), 2)


# ---- attention ------------------------------------------------------------------------------------


def bounds(q, cache, plan, slots, scale):
    """(o', P_BOUND, FULL_BOUND): see the module docstring. o' is float64 attention with 8-bit q^ and float P."""
    b, hq, d = q.shape
    hkv, pi = cache.num_kv_heads, cache.fmt.pi
    k, v = (x.double().repeat_interleave(hq // hkv, 1) for x in dequantize_kv(cache, plan, slots))  # [B,Hq,T,D]
    valid = (torch.arange(k.shape[2]) < plan.context_lens[:, None])[:, None, :]  # [B, 1, T]
    qs = (q.float() * scale).view(b, hq, d // pi, pi)
    qq = hack.quantize(qs, 8, meta_dtype=None)
    q_hat = dequantize(qq).double().view(b, hq, d)
    p = torch.softmax(torch.einsum("bhd,bhtd->bht", (q.double() * scale), k).masked_fill(~valid, -torch.inf), -1)
    p1 = torch.softmax(torch.einsum("bhd,bhtd->bht", q_hat, k).masked_fill(~valid, -torch.inf), -1)
    o1 = torch.einsum("bht,bhtd->bhd", p1, v)
    full = (torch.arange(k.shape[2]) < (plan.context_lens // pi * pi)[:, None])[:, None, :, None]  # full blocks
    absv = torch.where(full, v.abs(), 0.0).view(b, hq, -1, pi, d)
    blk_max = lambda pp: pp.view(b, hq, -1, pi).amax(-1)  # [B, Hq, W]
    p_bound = torch.einsum("bhw,bhwd->bhd", blk_max(p1), absv.sum(3)) / 510
    delta = (qq.scale.double() / 2)[:, :, None, :] * k.abs().view(b, hq, -1, d // pi, pi).sum(-1)  # [B,Hq,T,P]
    e2d = torch.exp(2 * delta.sum(-1).masked_fill(~valid, 0).amax(-1, keepdim=True))  # [B, Hq, 1]
    full_bound = (e2d - 1) * torch.where(valid[..., None], v.abs(), 0).amax(2) \
        + e2d * torch.einsum("bhw,bhwd->bhd", blk_max(p), absv.sum(3)) / 510
    return o1, p_bound + 2e-5, full_bound + 2e-5


def textbook_lse(q, cache, plan, slots, scale):
    """float64 log-sum-exp of the scores of 8-bit q^ against K^: [B, Hq]."""
    b, hq, d = q.shape
    k = dequantize_kv(cache, plan, slots)[0].double().repeat_interleave(hq // cache.num_kv_heads, 1)
    q_hat = dequantize(hack.quantize((q.float() * scale).view(b, hq, -1, cache.fmt.pi), 8, None)).double()
    s = torch.einsum("bhd,bhtd->bht", q_hat.view(b, hq, d), k)
    return torch.logsumexp(s.masked_fill(torch.arange(k.shape[2]) >= plan.context_lens[:, None, None], -torch.inf), -1)


CASES = [  # hq, hkv, d, bits, pi, lens: GQA 1/3/4, contexts off the partition size, mixed lengths
    (9, 3, 64, 2, 64, [1, 500, 64, 130]),
    (4, 4, 64, 4, 64, [77, 300]),
    (8, 2, 128, 8, 64, [200, 1, 65]),
    (6, 2, 64, 2, 32, [33, 95]),
    (4, 1, 128, 4, 128, [250]),
    (10, 2, 64, 2, 64, [70, 129]),  # G = 5: the compiled path's general head-group loop
    (4, 2, 64, 4, 32, [40]),  # G = 2
    (16, 1, 64, 2, 16, [50, 17]),  # G = 16 (AVX-512: four passes of 4 heads), the smallest partition
    (8, 1, 128, 2, 128, [300]),  # 2-bit partitions of 128: AVX-512's prepared codes from two vectors
    (4, 2, 64, 8, 32, [70, 33]),  # 8-bit codes in partitions of 32 and of 128 (AVX-512: vpermb per 4 positions)
    (4, 1, 128, 8, 128, [260]),
]


@pytest.mark.parametrize("hq,hkv,d,bits,pi,lens", CASES)
def test_reference_against_float64(hq, hkv, d, bits, pi, lens):
    cache, plan, slots, _ = reference_cache(HackFormat(bits=bits, pi=pi), hkv, d, lens)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(1))
    out, lse = hack_decode_attention_reference(q, cache, plan, d**-0.5, slots)
    o1, p_bound, full_bound = bounds(q, cache, plan, slots, d**-0.5)
    assert ((out.double() - o1).abs() <= p_bound).all()  # the four-term formula, P rounding only
    assert ((out.double() - dequantize_then_attention(q, cache, plan, d**-0.5, slots).double()).abs()
            <= full_bound).all()  # the INT8 rounding bound against "dequantize then dense"
    torch.testing.assert_close(lse.double(), textbook_lse(q, cache, plan, slots, d**-0.5), rtol=0, atol=2e-5)


@needs_fast
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hq,hkv,d,bits,pi,lens", CASES)
def test_compiled_against_reference(isa, hq, hkv, d, bits, pi, lens):
    cache, plan, slots, _ = reference_cache(HackFormat(bits=bits, pi=pi), hkv, d, lens)
    q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    ref, ref_lse = hack_decode_attention_reference(q, cache, plan, d**-0.5, slots)
    o1, p_bound, _ = bounds(q, cache, plan, slots, d**-0.5)
    for segments in (0, 1, 3):  # split-KV segments merged by log-sum-exp
        try:
            fast.set_isa(isa)
            out, lse = fast.hack_decode_attention(q, *cache.kernel_args(), plan.block_tables, plan.context_lens,
                                                  slots, d**-0.5, bits, segments)
        finally:
            fast.set_isa("auto")
        assert ((out.double() - o1).abs() <= p_bound).all()
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)  # a few P codes may round the other way
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=5e-5)


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16])
def test_public_path_against_dense(kernel_path, qdtype):
    cache, plan, slots, _ = build_cache(HackFormat(bits=2), 3, 64, [300, 64, 1], hack_write)
    q = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(3)).to(qdtype)
    out, lse = hack_decode_attention(q, cache, plan, 0.125, slots)
    assert out.dtype == qdtype and lse.shape == (3, 9) and lse.dtype == torch.float32
    _, _, full_bound = bounds(q.float(), cache, plan, slots, 0.125)
    dense = dequantize_then_attention(q.float(), cache, plan, 0.125, slots)
    slack = 0.0 if qdtype == torch.float32 else 1e-2  # bf16 rounding of the output
    assert ((out.double() - dense.double()).abs() <= full_bound + slack).all()


def test_merges_with_a_float_tier(kernel_path):
    """(out, lse) of HACK over a prefix merges with float attention over the rest by log-sum-exp."""
    cache, plan, slots, kv = build_cache(HackFormat(bits=8), 2, 64, [150], hack_write)
    g = torch.Generator().manual_seed(4)
    k2, v2 = torch.randn(1, 2, 16, 64, generator=g), torch.randn(1, 2, 16, 64, generator=g)  # 16 more tokens
    q = torch.randn(1, 4, 64, generator=g)
    part1 = hack_decode_attention(q, cache, plan, 0.125, slots)
    part2 = paged_decode_attention(q, k2, v2, DecodePlan(torch.tensor([[0]]), torch.tensor([16])), 0.125,
                                   return_lse=True)
    out, _ = merge_attention([part1, part2])
    k1, v1 = dequantize_kv(cache, plan, slots)
    k, v = torch.cat([k1[:, :, :150], k2[0][None]], 2), torch.cat([v1[:, :, :150], v2[0][None]], 2)
    dense = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.125, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, dense, rtol=0, atol=2e-2)  # 8-bit codes, INT8 Q and P


@pytest.mark.gpu
def test_reference_runs_on_cuda():
    cache, plan, slots, _ = build_cache(HackFormat(bits=2), 3, 64, [200, 7], hack_write_reference)
    q = torch.randn(2, 9, 64)
    out, lse = hack_decode_attention_reference(q, cache, plan, 0.125, slots)
    cuda = HackCache(cache.fmt, cache.blocks.cuda(), cache.v_tail.cuda())
    plan_c = DecodePlan(plan.block_tables.cuda(), plan.context_lens.cuda())
    out_c, lse_c = hack_decode_attention(q.cuda(), cuda, plan_c, 0.125, slots.cuda())
    torch.testing.assert_close(out_c.cpu(), out, rtol=0, atol=2e-3)
    torch.testing.assert_close(lse_c.cpu(), lse, rtol=0, atol=1e-4)
