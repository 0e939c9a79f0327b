"""KCache: the compiled path against the torch reference, both against a float64 textbook; exactly N
selected V rows per KV head, only those rows read, and dense attention when N is the whole context."""

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.kernels import ext
from kvtier.kernels.attention import DecodePlan, paged_decode_attention_reference
from kvtier.kernels.kcache import (
    KCacheOptions,
    kcache_decode_attention,
    kcache_decode_attention_reference,
    selected_counts,
)

fast = ext.load("kcache")
needs_fast = pytest.mark.skipif(fast is None, reason="compiled KCache kernels unavailable here")


def paged_case(batch, ctx_max, hq, hkv, d, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, ctx_max + 1, (batch,), generator=g)
    ctx[0] = ctx_max  # at least one long sequence, lengths mixed
    width = int((ctx.max() + bs - 1) // bs)
    nb = batch * width + 3
    k = (torch.randn(nb, hkv, bs, d, generator=g) * 2).to(dtype)  # peaked attention: top-N matters
    v = torch.randn(nb, hkv, bs, d, generator=g).to(dtype)
    tables = torch.randperm(nb, generator=g)[: batch * width].view(batch, width)
    return torch.randn(batch, hq, d, generator=g).to(dtype), k, v, DecodePlan(tables, ctx)


def rows(cache, plan, b, n):  # [Hkv, n, D] float64 of sequence b
    return cache[plan.block_tables[b]].transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[-1])[:, :n].double()


def textbook(q, k, v, plan, scale, selected, renormalize):
    """float64 KCache over the given selection: (out [B, Hq, D], lse [B, Hq], group probabilities per sequence)."""
    b_, hq, _ = q.shape
    hkv = k.shape[1]
    outs, lses, aggs = [], [], []
    for b in range(b_):
        n = int(plan.context_lens[b])
        kk, vv = rows(k, plan, b, n).repeat_interleave(hq // hkv, 0), rows(v, plan, b, n)
        s = torch.einsum("hd,htd->ht", q[b].double(), kk) * scale  # [Hq, n]
        p = torch.softmax(s, -1)
        aggs.append(p.view(hkv, hq // hkv, n).sum(1))  # [Hkv, n]
        sel = selected[b]  # [Hkv, N]
        keep = torch.zeros(hkv, n, dtype=torch.bool)
        for h in range(hkv):
            keep[h, sel[h][sel[h] >= 0]] = True
        pk = torch.where(keep.repeat_interleave(hq // hkv, 0), p, 0.0)
        o = torch.einsum("ht,htd->hd", pk, vv.repeat_interleave(hq // hkv, 0))
        lse = torch.logsumexp(s, -1)
        if renormalize:
            o, lse = o / pk.sum(-1, keepdim=True), lse + torch.log(pk.sum(-1))
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses), aggs


def check_selection(selected, counts, aggs, tol):
    """Exactly counts[b] positions per KV head, ascending, distinct, in range, and a top-N of the group mass."""
    for b, agg in enumerate(aggs):
        n, ctx = int(counts[b]), agg.shape[1]
        for h in range(agg.shape[0]):
            sel = selected[b, h]
            assert (sel[n:] == -1).all() and (sel[:n] >= 0).all() and (sel[:n] < ctx).all()
            assert (sel[1:n] > sel[: n - 1]).all()  # ascending, hence distinct
            mask = torch.zeros(ctx, dtype=torch.bool)
            mask[sel[:n]] = True
            if n < ctx:
                assert agg[h][mask].min() >= agg[h][~mask].max() - tol


SHAPES = [  # batch, ctx, hq, hkv, d, bs: GQA 1/3/4, contexts off the block size, mixed lengths
    (3, 37, 9, 3, 64, 16), (4, 300, 8, 2, 128, 16), (2, 1000, 4, 1, 64, 8), (5, 77, 4, 4, 32, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("top_n", [0.1, 5, 1.0])
@pytest.mark.parametrize("renormalize", [True, False])
def test_against_float64(kernel_path, shape, dtype, tol, top_n, renormalize):
    q, k, v, plan = paged_case(*shape, dtype)
    scale = shape[4] ** -0.5
    out, lse, selected = kcache_decode_attention(q, k, v, plan, scale, top_n, renormalize)
    counts = selected_counts(plan.context_lens, top_n)
    assert out.dtype == dtype and lse.shape == q.shape[:2] and selected.shape == (*shape[0:1], shape[3], counts.max())
    ref_out, ref_lse, aggs = textbook(q, k, v, plan, scale, selected, renormalize)
    check_selection(selected, counts, aggs, 1e-5 if dtype == torch.float32 else 1e-3)
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)


@needs_fast
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_matches_reference(shape, dtype):
    q, k, v, plan = paged_case(*shape, dtype, seed=1)
    counts = selected_counts(plan.context_lens, 0.2)
    scale = shape[4] ** -0.5
    out, lse, sel = fast.kcache_decode_attention(q, k, v, plan.block_tables, plan.context_lens, counts, scale, True)
    ref = kcache_decode_attention_reference(q, k, v, DecodePlan(plan.block_tables, plan.context_lens), scale, counts)
    assert torch.equal(sel, ref.selected)  # no near-ties in random data: the same rows
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref.out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref.lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_whole_context_is_dense_attention(kernel_path, renormalize):
    q, k, v, plan = paged_case(4, 200, 9, 3, 64, 16, torch.float32)
    out, lse, selected = kcache_decode_attention(q, k, v, plan, 0.125, 1.0, renormalize)
    dense, dense_lse = paged_decode_attention_reference(q, k, v, DecodePlan(plan.block_tables, plan.context_lens),
                                                        0.125)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, dense_lse, atol=2e-5, rtol=2e-5)
    n = plan.context_lens
    assert torch.equal((selected >= 0).sum(-1), n[:, None].expand(-1, 3))


def test_reads_only_the_selected_v_rows(kernel_path):
    """V rows outside the selection are poisoned with NaN: the output does not change."""
    q, k, v, plan = paged_case(3, 300, 8, 2, 64, 16, torch.float32)
    out, _, selected = kcache_decode_attention(q, k, v, plan, 0.125, 0.1)
    poisoned = torch.full_like(v, float("nan"))
    for b in range(3):
        for h in range(2):
            pos = selected[b, h][selected[b, h] >= 0]
            blocks, offs = plan.block_tables[b][pos // 16], pos % 16
            poisoned[blocks, h, offs] = v[blocks, h, offs]
    out2, _, selected2 = kcache_decode_attention(q, k, poisoned, plan, 0.125, 0.1)
    assert torch.equal(selected2, selected) and torch.equal(out2, out)


def test_counts_and_options():
    ctx = torch.tensor([1, 9, 10, 510, 1000])
    assert selected_counts(ctx, 0.1).tolist() == [1, 1, 1, 51, 100]
    assert selected_counts(ctx, 64).tolist() == [1, 9, 10, 64, 64]
    assert selected_counts(ctx, 1.0).tolist() == ctx.tolist()
    for bad in (0, -3, 0.0, 1.5, True, "10"):
        with pytest.raises(ConfigError):
            KCacheOptions(top_n=bad)
    opts = KCacheOptions(top_n=256, exempt_layers=(0, 1))
    assert not opts.applies_to(0) and opts.applies_to(2)


@pytest.mark.gpu
def test_reference_runs_on_cuda():
    q, k, v, plan = paged_case(3, 300, 8, 2, 64, 16, torch.float32)
    ref = kcache_decode_attention(q, k, v, plan, 0.125, 0.1)
    gpu_plan = DecodePlan(plan.block_tables.cuda(), plan.context_lens.cuda())
    got = kcache_decode_attention(q.cuda(), k.cuda(), v.cuda(), gpu_plan, 0.125, 0.1)
    assert torch.equal(got.selected.cpu(), ref.selected)
    torch.testing.assert_close(got.out.cpu(), ref.out, atol=1e-5, rtol=1e-5)
    host_v = kcache_decode_attention(q.cuda(), k.cuda(), v, gpu_plan, 0.125, 0.1)  # V in host memory
    assert torch.equal(host_v.out, got.out) and host_v.out.device == got.out.device
