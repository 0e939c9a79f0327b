"""Decode attention kernels against the machine's read bandwidth and against torch baselines, in one run.

    python benchmarks/bench_attention.py [--model smollm2|llama-3-8b] [--batches 1,8,32]
                                         [--contexts 512,2048,8192] [--layers N] [--budget 0.3]
                                         [--threads N] [--json out.json]

At each batch x context, with every sequence at that context and random block tables (the
pessimistic case: the engine's tables are mostly ascending), it runs: kvtier's paged decode
attention in float32, bfloat16 and float16, float32 and bfloat16 again over ascending tables
("asc"); KCache over the float32 cache keeping 10% of the context; HACK with 2, 4 and 8-bit codes
(pi = 64). For each it prints the time (best of the repeats fitting in --budget seconds), the KV
bytes the kernel must read, effective bandwidth = bytes / time and its share of the read bandwidth
measured around that point (kvtier.utils.membw, just before and just after it, the higher of the
two: a shared host's bandwidth moves from minute to minute), and speed ratios (baseline time /
kernel time) against torch SDPA over contiguous K/V of the same dtype (bfloat16 for HACK), against
"dequantize then SDPA" (HF transformers' QuantizedCache approach) for HACK, and against kvtier's
bfloat16 kernel. Small working sets fit in the caches, so their "bandwidth" can exceed the DRAM
figure; the goals are read at the largest point.

A point repeats one call on one cache, so at batch 1 the KV stays in the CPU's caches. The engine's step
reads every layer's KV once, from memory: the "xNL" rows (batch 1, the largest context) time float32,
bfloat16 and HACK 2-bit over --layers caches (default: the model's layer count), one call per layer, on
ascending block tables (one sequence's blocks, as the engine allocates them), and give the time per layer."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kvtier.kernels.attention import DecodePlan, paged_decode_attention
from kvtier.kernels.formats import HackFormat, kv_bytes
from kvtier.kernels.hack import HackCache, dequantize_then_attention, hack_decode_attention
from kvtier.kernels.kcache import kcache_decode_attention, selected_counts
from kvtier.utils.membw import read_bandwidth

MODELS = {"smollm2": (9, 3, 64), "llama-3-8b": (32, 8, 128)}  # Hq, Hkv, D
LAYERS = {"smollm2": 30, "llama-3-8b": 32}
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCK = 16  # float caches' block size, the engine's default
KCACHE_FRACTION = 0.1

try:  # huge pages for the caches where the OS offers them (as the engine's KV pool does)
    from kvtier.utils.memory import empty_hugepage
except ImportError:  # pragma: no cover
    empty_hugepage = None


@dataclass
class Row:
    kernel: str
    batch: int
    context: int
    ms: float
    mbytes: float  # KV bytes the kernel reads, MB
    gbps: float
    share: float  # of the read bandwidth measured around this point
    read_gbps: float  # that read bandwidth
    vs_sdpa: float | None = None
    vs_dequant_sdpa: float | None = None
    vs_kvtier_bf16: float | None = None
    v_rows: int | None = None  # KCache: V rows read per (sequence, KV head)


def best_time(fn, budget: float) -> float:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def empty(shape, dtype, device="cpu") -> torch.Tensor:
    return empty_hugepage(shape, dtype, device) if empty_hugepage is not None else torch.empty(shape, dtype=dtype)


def plan_for(batch: int, context: int, block: int, seed: int) -> DecodePlan:
    g = torch.Generator().manual_seed(seed)
    width = -(-context // block)
    tables = torch.randperm(batch * width, generator=g).view(batch, width)  # scattered blocks
    return DecodePlan(tables, torch.full((batch,), context))


def float_cache(batch, context, shape, dtype):
    """(q, k_cache, v_cache, plan) with random values, blocks of BLOCK tokens."""
    hq, hkv, d = shape
    plan = plan_for(batch, context, BLOCK, 0)
    caches = [empty((plan.block_tables.numel(), hkv, BLOCK, d), dtype).normal_() for _ in range(2)]
    return torch.randn(batch, hq, d).to(dtype), *caches, plan


def hack_cache(batch, context, shape, bits):
    """(q, cache, plan, slots): random codes and meta (timing only), blocks of pi tokens."""
    hq, hkv, d = shape
    fmt = HackFormat(bits=bits)
    plan = plan_for(batch, context, fmt.pi, 1)
    cache = HackCache.allocate(fmt, plan.block_tables.numel(), hkv, d, batch, empty=empty)
    cache.blocks.random_(0, 256)
    cache.v_tail.normal_()
    for role in ("k_scale", "k_min", "v_scale", "v_min"):
        cache.part(role).uniform_(0.01, 0.05)
    for role in ("k_sum", "v_sum"):
        cache.part(role).random_(0, fmt.pi * (2**bits - 1))
    return torch.randn(batch, hq, d), cache, plan, torch.arange(batch)


def sdpa_time(batch, context, shape, dtype, budget) -> float:
    hq, hkv, d = shape
    q = torch.randn(batch, hq, 1, d).to(dtype)
    k, v = torch.randn(batch, hkv, context, d).to(dtype), torch.randn(batch, hkv, context, d).to(dtype)
    return best_time(lambda: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True), budget)


def hack_read_bytes(batch, context, shape, fmt) -> int:
    """K codes and meta of every token, V codes and meta of the full blocks, the 16-bit tail rows."""
    _, hkv, d = shape
    acc = kv_bytes(fmt, hkv, d)
    parts = d // fmt.pi
    k_token = hkv * parts * (fmt.row_bytes + 6)  # codes, then scale + min (2 B each) and sum (2 B)
    v_block = acc.block - fmt.pi * k_token
    full, tail = divmod(context, fmt.pi)
    return batch * (context * k_token + full * v_block + tail * hkv * d * fmt.tail_dtype.itemsize)


def row(kernel, batch, context, seconds, nbytes, bw, **ratios) -> Row:
    """``bw``: the read bandwidth (bytes/s) to compare with; None until the point's is known (``measured``)."""
    gbps = nbytes / seconds / 1e9
    return Row(kernel, batch, context, seconds * 1e3, nbytes / 1e6, gbps, gbps * 1e9 / bw if bw else 0.0,
               bw / 1e9 if bw else 0.0, **ratios)


def measured(batch, context, shape, budget, point_fn=None) -> list[Row]:
    """One point's rows (``point``, or ``point_fn(bw)``), their shares against the read bandwidth measured
    just before and just after it."""
    before = read_bandwidth()
    rows = point(batch, context, shape, None, budget) if point_fn is None else point_fn(None)
    bw = max(before, read_bandwidth())
    for r in rows:
        r.share, r.read_gbps = r.gbps * 1e9 / bw, bw / 1e9
    return rows


def ascending(plan: DecodePlan) -> DecodePlan:
    return DecodePlan(torch.arange(plan.block_tables.numel()).view_as(plan.block_tables), plan.context_lens)


def float_rows(batch, context, shape, bw, budget) -> list[Row]:
    rows = []
    for name, dtype in FLOATS.items():
        rows += float_row(name, dtype, batch, context, shape, bw, budget)
    return rows


def float_row(name, dtype, batch, context, shape, bw, budget) -> list[Row]:
    """kvtier's paged kernel in one dtype (and KCache over the float32 cache)."""
    d = shape[2]
    q, k, v, plan = float_cache(batch, context, shape, dtype)
    t = best_time(lambda: paged_decode_attention(q, k, v, plan, d**-0.5), budget)
    nbytes = 2 * batch * context * shape[1] * d * dtype.itemsize
    t_sdpa = sdpa_time(batch, context, shape, dtype, budget)
    rows = [row(name, batch, context, t, nbytes, bw, vs_sdpa=t_sdpa / t)]
    if name in ("float32", "bfloat16"):  # the same cache, the engine's usual case: blocks in ascending order
        asc = ascending(plan)
        t_asc = best_time(lambda: paged_decode_attention(q, k, v, asc, d**-0.5), budget)
        rows.append(row(f"{name} asc", batch, context, t_asc, nbytes, bw, vs_sdpa=t_sdpa / t_asc))
    if name == "float32":
        rows.append(kcache_row(q, k, v, plan, batch, context, shape, bw, budget, t_sdpa))
    return rows


def kcache_row(q, k, v, plan, batch, context, shape, bw, budget, t_sdpa) -> Row:
    d = shape[2]
    t = best_time(lambda: kcache_decode_attention(q, k, v, plan, d**-0.5, KCACHE_FRACTION), budget)
    v_rows = int(selected_counts(plan.context_lens, KCACHE_FRACTION)[0])
    out = kcache_decode_attention(q, k, v, plan, d**-0.5, KCACHE_FRACTION)
    assert int((out.selected[0, 0] >= 0).sum()) == v_rows  # V traffic: N rows per KV head, not the context
    nbytes = batch * shape[1] * (context + v_rows) * d * 4
    name = f"kcache f32 N={int(KCACHE_FRACTION * 100)}%"
    return row(name, batch, context, t, nbytes, bw, vs_sdpa=t_sdpa / t, v_rows=v_rows)


def hack_rows(batch, context, shape, bw, budget, t_bf16, t_sdpa16) -> list[Row]:
    return [hack_row(bits, batch, context, shape, bw, budget, t_bf16, t_sdpa16) for bits in (2, 4, 8)]


def hack_row(bits, batch, context, shape, bw, budget, t_bf16, t_sdpa16) -> Row:
    d = shape[2]
    q, cache, plan, slots = hack_cache(batch, context, shape, bits)
    t = best_time(lambda: hack_decode_attention(q, cache, plan, d**-0.5, slots), budget)
    t_deq = best_time(lambda: dequantize_then_attention(q, cache, plan, d**-0.5, slots), budget)
    nbytes = hack_read_bytes(batch, context, shape, cache.fmt)
    return row(f"hack{bits}", batch, context, t, nbytes, bw, vs_sdpa=t_sdpa16 / t, vs_dequant_sdpa=t_deq / t,
               vs_kvtier_bf16=t_bf16 / t)


def point(batch, context, shape, bw, budget) -> list[Row]:
    rows = float_rows(batch, context, shape, bw, budget)
    bf16 = next(r for r in rows if r.kernel == "bfloat16")
    t_bf16 = bf16.ms / 1e3
    return rows + hack_rows(batch, context, shape, bw, budget, t_bf16, t_bf16 * bf16.vs_sdpa)


def per_call(fn, calls, budget) -> float:
    """Best time of one sweep of ``fn(*args)`` over ``calls``, per call."""
    return best_time(lambda: [fn(*c) for c in calls], budget) / len(calls)


def layered_rows(context, shape, layers, bw, budget) -> list[Row]:
    """Batch 1, one call on each of ``layers`` caches in turn (the engine's step); times per layer."""
    scale, rows = shape[2] ** -0.5, []
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        calls = [(q, k, v, ascending(plan), scale) for q, k, v, plan in
                 (float_cache(1, context, shape, dtype) for _ in range(layers))]
        t = per_call(paged_decode_attention, calls, budget)
        rows.append(row(f"{name} x{layers}L", 1, context, t, 2 * context * shape[1] * shape[2] * dtype.itemsize, bw))
        del calls  # before the next dtype's caches
    calls = [(q, cache, ascending(plan), scale, slots) for q, cache, plan, slots in
             (hack_cache(1, context, shape, 2) for _ in range(layers))]
    t = per_call(hack_decode_attention, calls, budget)
    nbytes = hack_read_bytes(1, context, shape, calls[0][1].fmt)
    return rows + [row(f"hack2 x{layers}L", 1, context, t, nbytes, bw, vs_kvtier_bf16=rows[-1].ms / 1e3 / t)]


def fmt_ratio(x: float | None) -> str:
    return f"{x:8.2f}x" if x is not None else " " * 9


def print_header() -> None:
    print(f"{'kernel':<16}{'B':>4}{'ctx':>6}{'ms':>9}{'MB read':>9}{'GB/s':>8}{'of bw':>7}{'bw':>6}"
          f"{'vs SDPA':>10}{'vs deq+SDPA':>12}{'vs bf16':>10}")


def print_rows(rows: list[Row]) -> None:
    for r in rows:
        print(f"{r.kernel:<16}{r.batch:>4}{r.context:>6}{r.ms:>9.3f}{r.mbytes:>9.1f}{r.gbps:>8.1f}{r.share:>7.0%}"
              f"{r.read_gbps:>6.0f}"
              f"{fmt_ratio(r.vs_sdpa):>10}{fmt_ratio(r.vs_dequant_sdpa):>12}{fmt_ratio(r.vs_kvtier_bf16):>10}")


def print_goals(rows: list[Row]) -> None:
    big = max((r.batch * r.context, r.batch) for r in rows)
    at = lambda k: next(r for r in rows if r.kernel == k and (r.batch * r.context, r.batch) == big)
    f32, bf16 = at("float32"), at("bfloat16")
    print(f"\ngoals at the largest point (B={f32.batch}, ctx={f32.context}):")
    for r, goal in ((f32, 80), (bf16, 70)):
        print(f"  {r.kernel} paged decode: {r.share:.0%} of read bandwidth {r.read_gbps:.1f} GB/s (goal >= {goal}%) "
              f"on random block tables; {at(r.kernel + ' asc').share:.0%} on ascending ones")
    ctx = max(r.context for r in rows)
    for r in (r for r in rows if r.kernel == "hack2" and r.context == ctx):
        print(f"  hack2 at ctx {ctx}, B={r.batch}: {r.vs_kvtier_bf16:.2f}x kvtier bf16 (goal >= 3x), "
              f"{r.vs_dequant_sdpa:.1f}x dequantize-then-SDPA (goal >= 10x)")
    for r in (r for r in rows if r.kernel.startswith("hack2 x")):
        print(f"  hack2 at ctx {r.context}, B=1, one call per layer over {r.kernel.split('x')[1][:-1]} layers "
              f"(the engine's step): {r.vs_kvtier_bf16:.2f}x kvtier bf16")
    kc = next(r for r in rows if r.kernel.startswith("kcache") and r.context == ctx)
    print(f"  kcache at ctx {ctx}: V rows read per KV head = {kc.v_rows} (N), not {ctx}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="attention shapes (Hq, Hkv, D)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--layers", type=int, default=None,
                    help="caches the batch-1 engine-step rows cycle through (default: the model's layers; 0: none)")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of repeats per timing (best of them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = MODELS[args.model]
    print(f"machine: {torch.get_num_threads()} threads; {args.model}: Hq={shape[0]}, Hkv={shape[1]}, D={shape[2]}; "
          "bw: read bandwidth around each point, GB/s")
    rows = []
    print_header()
    batches, contexts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")]
    for batch in batches:
        for context in contexts:
            new = measured(batch, context, shape, args.budget)
            print_rows(new)
            rows += new
    layers = LAYERS[args.model] if args.layers is None else args.layers
    if layers > 0 and 1 in batches:
        context = max(contexts)
        new = measured(1, context, shape, args.budget, lambda bw: layered_rows(context, shape, layers, bw, args.budget))
        print_rows(new)
        rows += new
    print_goals(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
