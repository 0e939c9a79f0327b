"""Compiled CPU kernels against the plain-torch references (which the parity tests tie to HF)."""

import pytest
import torch

from kvtier.kernels import attention, ext, ops
from kvtier.kernels.attention import DecodePlan

fast = ext.load()
pytestmark = pytest.mark.skipif(fast is None, reason="compiled kernels unavailable here")


def paged_case(batch, ctx_max, hq, hkv, d, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, ctx_max + 1, (batch,), generator=g)
    width = int((ctx.max() + bs - 1) // bs)
    nb = batch * width + 3
    k = torch.randn(nb, hkv, bs, d, generator=g).to(dtype)
    v = torch.randn(nb, hkv, bs, d, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: batch * width].view(batch, width)
    q = torch.randn(batch, hq, d, generator=g).to(dtype)
    return q, k, v, tables, ctx


@pytest.fixture(params=["generic", "avx2", "avx512"])
def decode_isa(request):
    """Each of the decode kernel's passes this CPU can run: 8-float ("generic": float16 widened in integer
    ops; "avx2": by F16C) and 16-float ("avx512")."""
    try:
        fast.set_decode_isa(request.param)
    except RuntimeError:
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    fast.set_decode_isa("auto")


def textbook(q, k, v, tables, ctx, scale):
    """float64 attention, one sequence at a time, from the block tables."""
    outs = []
    hq, hkv = q.shape[1], k.shape[1]
    for b in range(q.shape[0]):
        n = int(ctx[b])
        kk = k[tables[b]].transpose(0, 1).reshape(hkv, -1, k.shape[-1])[:, :n].double()
        vv = v[tables[b]].transpose(0, 1).reshape(hkv, -1, k.shape[-1])[:, :n].double()
        kk, vv = kk.repeat_interleave(hq // hkv, 0), vv.repeat_interleave(hq // hkv, 0)
        p = torch.softmax((q[b].double()[:, None, :] @ kk.transpose(1, 2)).squeeze(1) * scale, -1)
        outs.append((p[:, None, :] @ vv).squeeze(1))
    return torch.stack(outs)


@pytest.mark.parametrize("batch,ctx,hq,hkv,d,bs", [
    (1, 1, 4, 4, 64, 16), (3, 37, 9, 3, 64, 16), (8, 300, 8, 2, 128, 16), (2, 1000, 4, 1, 64, 8),
    (5, 77, 6, 3, 32, 32), (2, 500, 10, 2, 128, 64), (1, 3000, 14, 2, 64, 16),
])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("segments", [0, 1, 3])
def test_paged_decode_attention(batch, ctx, hq, hkv, d, bs, dtype, tol, segments, decode_isa):
    q, k, v, tables, lens = paged_case(batch, ctx, hq, hkv, d, bs, dtype)
    ref = textbook(q, k, v, tables, lens, d**-0.5)
    out, lse = fast.paged_decode_attention(q, k, v, tables, lens, d**-0.5, segments)
    assert out.dtype == dtype and lse.shape == (batch, hq)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch_ref, _ = attention.paged_decode_attention_reference(q, k, v, DecodePlan(tables, lens), d**-0.5)
    torch.testing.assert_close(torch_ref.double(), ref, atol=tol, rtol=tol)


def test_write_kv_matches_index_put():
    k_cache, v_cache = torch.zeros(6, 2, 4, 8), torch.zeros(6, 2, 4, 8)
    qkv = torch.randn(5, 6, 8)  # strided views, as the model passes them
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    blocks, offsets = torch.tensor([5, 5, 0, 3, 3]), torch.tensor([0, 1, 3, 2, 3])
    fast.write_kv(k_cache, v_cache, k, v, blocks, offsets)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    attention.write_kv_reference(k_ref, v_ref, k, v, blocks, offsets)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_rounds_float32_rows_into_a_16_bit_cache(dtype):
    """The decode path writes float32 K/V straight into a 16-bit cache: the same bits as Tensor.to."""
    k_cache, v_cache = torch.zeros(4, 3, 8, 64, dtype=dtype), torch.zeros(4, 3, 8, 64, dtype=dtype)
    k, v = torch.randn(5, 3, 64) * 100, torch.randn(5, 3, 64)
    blocks, offsets = torch.tensor([1, 1, 3, 0, 2]), torch.tensor([0, 7, 2, 5, 5])
    fast.write_kv(k_cache, v_cache, k, v, blocks, offsets)
    assert torch.equal(k_cache[blocks, :, offsets], k.to(dtype))
    assert torch.equal(v_cache[blocks, :, offsets], v.to(dtype))
    with pytest.raises(RuntimeError, match="float32 or the cache's dtype"):
        fast.write_kv(k_cache, v_cache, k.double(), v.double(), blocks, offsets)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_norms_rope_silu(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x, h = (torch.randn(7, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(96, generator=g).to(dtype)
    torch.testing.assert_close(fast.rms_norm(x, w, 1e-5), ops.rms_norm_reference(x, w, 1e-5), atol=tol, rtol=tol)
    h2 = h.clone()
    y = fast.add_rms_norm(h2, x, w, 1e-5)
    torch.testing.assert_close(h2, h + x, atol=tol, rtol=tol)
    torch.testing.assert_close(y, ops.rms_norm_reference(h + x, w, 1e-5), atol=tol, rtol=tol)
    cos, sin = torch.randn(50, 16, generator=g).to(dtype), torch.randn(50, 16, generator=g).to(dtype)
    pos = torch.tensor([0, 3, 49, 7, 7, 1, 20])
    xr = torch.randn(7, 5, 16, generator=g).to(dtype)
    expect = xr * cos[pos][:, None] + torch.cat((xr[..., 8:], xr[..., :8]), -1) * sin[pos][:, None]
    got = xr.clone()
    fast.rope_(got, cos, sin, pos)
    torch.testing.assert_close(got, expect, atol=tol, rtol=tol)
    gu = torch.randn(7, 64, generator=g).to(dtype) * 4
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(fast.silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=tol, rtol=tol)


@pytest.mark.parametrize("n,k", [(1, 1), (5, 33), (960, 576), (1027, 130)])
def test_gemv(n, k):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(fast.gemv(x, w, None), x @ w.T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.gemv(x, w, b), x @ w.T + b, atol=1e-4, rtol=1e-4)


def test_float16_widening_covers_subnormals_inf_and_nan(decode_isa):
    special = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, float("inf"), float("-inf")] * 8,
                           dtype=torch.float16)
    x = torch.cat([special, torch.randn(2048 - special.numel()).half()])
    k = x.view(-1, 1, 16, 64)  # blocks of one head, 16 tokens, head_dim 64
    ones = torch.ones_like(k)
    q = torch.zeros(k.shape[0], 1, 64, dtype=torch.float16)
    tables = torch.arange(k.shape[0]).view(-1, 1)
    ctx = torch.full((k.shape[0],), 16)
    # uniform attention over 16 ones-rows of V returns 1; over rows of x, their column means
    out, _ = fast.paged_decode_attention(q, ones, k, tables, ctx, 1.0, 1)
    expect = k.float().mean(dim=2)[:, 0]
    torch.testing.assert_close(out[:, 0].float(), expect.half().float(), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_combines_attention_over_split_blocks(dtype, kernel_path):
    """Attention over blocks split between two caches (memory tiers) merges to the full result."""
    q, k, v, tables, ctx = paged_case(4, 200, 8, 2, 64, 16, dtype, seed=3)
    full = attention.paged_decode_attention(q, k, v, DecodePlan(tables, ctx), 0.125)
    cut = 5  # the first 5 blocks of every sequence live in tier A, the rest in tier B
    ctx_a = ctx.clamp(max=cut * 16)
    ctx_b = ctx - ctx_a
    tables_b = tables[:, cut:] if tables.shape[1] > cut else tables[:, :1]
    assert bool((ctx_b == 0).any()) and bool((ctx_b > 0).any()), "some sequences must lie in tier A only"
    part_a = attention.paged_decode_attention(q, k, v, DecodePlan(tables[:, :cut], ctx_a), 0.125, True)
    part_b = attention.paged_decode_attention(q, k.clone(), v.clone(), DecodePlan(tables_b, ctx_b), 0.125, True)
    merged, _ = attention.merge_attention([part_a, part_b])
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(merged.float(), full.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_lse_gives_each_blocks_attention_mass(dtype, kernel_path):
    q, k, v, tables, ctx = paged_case(3, 100, 6, 2, 64, 16, dtype, seed=5)
    out, lse, blse = attention.paged_decode_attention(q, k, v, DecodePlan(tables, ctx), 0.125, block_lse=True)
    mass = torch.exp(blse - lse[..., None])  # [B, Hq, W]
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(lse), atol=1e-4, rtol=1e-4)
    for b in range(3):  # each block's mass is the softmax summed over its tokens
        n = int(ctx[b])
        kk = k[tables[b]].transpose(0, 1).reshape(2, -1, 64)[:, :n].float().repeat_interleave(3, 0)
        p = torch.softmax((q[b].float()[:, None] @ kk.transpose(1, 2)).squeeze(1) * 0.125, -1)  # [Hq, n]
        expect = torch.nn.functional.pad(p, (0, tables.shape[1] * 16 - n)).view(6, -1, 16).sum(-1)
        torch.testing.assert_close(mass[b], expect, atol=1e-3, rtol=1e-3)
