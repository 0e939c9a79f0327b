"""``kvtier profile``: measure this machine and write a hardware file the simulator reads.

What is measured is what the cost model asks for, through kvtier's own code paths:
- memory: read (a streaming sum, ``utils.membw``), write (fill) and copy bandwidth of large buffers;
- matmul: throughput of ``models.llama.Linear`` (GEMV for one row, oneDNN-packed GEMM for more) at
  row counts 1..1024, per dtype, cycling through weights three times the last-level cache so each
  call streams its weight from memory as a decode step does;
- attention: kvtier's paged decode kernel (read rate and per-sequence cost, fitted) and prefill
  attention (causal, and after a cached prefix), at the model's head shape;
- engine overheads: a two-layer and an eight-layer random ``tiny-llama`` engine stepped at batch 1
  and 16; what the cost model does not explain is fitted as per-op, per-step and per-sequence time;
- linears in situ: decode steps of the profiled model (random weights) at batch 1 and 8; the
  matmul curves' time for its linears over what they take inside a forward pass (weights, KV and
  activations compete for the caches and the TLB there) is the matmul efficiency;
- with a CUDA GPU: device copy bandwidth and matmul, host memory, and pinned host<->device copies one
  way and both ways at once.
Each figure is the best of several runs (other work on the machine only slows runs down).
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvtier.models.config import ModelConfig
from kvtier.sim.units import format_rate

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_ROWS = (1, 4, 16, 64, 256)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class ProfileOptions:
    dtypes: tuple[str, ...] = ("float32",)
    quick: bool = False  # fewer points and smaller buffers (tests, a first look)
    repeats: int = 5
    model: ModelConfig | None = None  # head shape for the attention kernels (default: the default model)
    model_name: str = "smollm2-135m"  # the same model as a shape the engine loads with dummy weights (in situ)
    say: Callable[[str], None] = field(default=lambda msg: None)


_CLOCK = [time.perf_counter]


def use_cpu_clock(on: bool = True) -> None:
    """Time with this thread's CPU time instead of the wall clock: on a shared machine, with one torch
    thread, a measurement then counts only the work done, not the time other processes held the CPU."""
    if on:
        assert torch.get_num_threads() == 1, "the CPU-time clock needs torch.set_num_threads(1)"
    _CLOCK[0] = time.thread_time if on else time.perf_counter


def clock() -> float:
    return _CLOCK[0]()


def cpu_clock_on() -> bool:
    return _CLOCK[0] is time.thread_time


_STATISTIC = ["median"]


def use_statistic(name: str) -> None:
    """``median`` (typical runs, what the engine sees) or ``min`` (the best run) of each measurement."""
    assert name in ("median", "min"), name
    _STATISTIC[0] = name


def best_of(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """The median (or, with ``use_statistic("min")``, the fastest) of ``repeats`` timed calls after one
    warm-up, in seconds."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
    return float(np.median(times)) if _STATISTIC[0] == "median" else min(times)


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def llc_bytes() -> int:
    """The last-level cache of this CPU (32 MiB when /sys does not say)."""
    for index in (3, 2):
        p = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        if p.is_file():
            text = p.read_text().strip().upper()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * mult
    return 32 * 2**20


# ---- memory ----------------------------------------------------------------------------------------

def memory_bandwidth(device: torch.device, mib: int, repeats: int) -> dict[str, float]:
    """Read, write and copy (bytes read + written) rates of a ``mib`` MiB float32 buffer, bytes/s."""
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    sync = _sync(device)
    read = best_of(lambda: x.sum(), repeats, sync)
    write = best_of(lambda: y.fill_(1.0), repeats, sync)
    copy = best_of(lambda: y.copy_(x), repeats, sync)
    nbytes = n * 4
    return {"read": nbytes / read, "write": nbytes / write, "copy": 2 * nbytes / copy}


# ---- matmul ----------------------------------------------------------------------------------------

def matmul_curve(dtype: torch.dtype, device: torch.device, rows: tuple[int, ...], repeats: int,
                 shape: tuple[int, int], ring_bytes: int, budget_s: float = 0.5,
                 fixed: Callable[[int], float] = lambda rows: 0.0) -> tuple[list[int], list[float]]:
    """FLOP/s of ``Linear`` at each row count on a ring of cold weights of one shape."""
    curves = matmul_curves(dtype, device, rows, repeats, [shape], ring_bytes, budget_s, fixed)
    return curves[tuple(shape)]


def matmul_curves(dtype: torch.dtype, device: torch.device, rows: tuple[int, ...], repeats: int,
                  shapes: list[tuple[int, int]], ring_bytes: int, budget_s: float = 0.5,
                  fixed: Callable[[int], float] = lambda rows: 0.0) -> dict[tuple[int, int], tuple[list, list]]:
    """FLOP/s of ``Linear`` per weight shape at each row count. The shapes are interleaved in the given
    order (a layer's linears, as a forward pass runs them) and copied until the ring exceeds
    ``ring_bytes``, so every call streams its weight from memory; each call is timed on its own, and
    ``fixed(rows)`` (the call's fixed cost, which the cost model adds back) is taken off each call.
    Row counts stop growing once a pass over the ring takes longer than ``budget_s``."""
    from kvtier.models.llama import Linear

    shapes = [tuple(s) for s in shapes]
    group = sum(o * i for o, i in shapes) * dtype.itemsize
    lins = [(shape, Linear(torch.randn(*shape, dtype=dtype, device=device) * 0.02))
            for _ in range(max(2, -(-ring_bytes // group))) for shape in shapes]
    sync = _sync(device)
    out: dict[tuple[int, int], tuple[list[int], list[float]]] = {s: ([], []) for s in shapes}
    for r in rows:
        xs = {i: torch.randn(r, i, dtype=dtype, device=device) for _, i in shapes}
        per_shape = {s: [] for s in shapes}
        for rep in range(repeats + 1):
            totals = _timed_pass(lins, xs, sync)
            for s in shapes:
                if rep:  # the first pass warms up
                    per_shape[s].append(totals[s])
        for s in shapes:
            secs = float(np.median(per_shape[s])) if _STATISTIC[0] == "median" else min(per_shape[s])
            count = sum(1 for shape, _ in lins if shape == s)
            secs = max(secs - count * fixed(r), 0.1 * secs)
            out[s][0].append(r)
            out[s][1].append(2 * r * s[0] * s[1] * count / secs)
        if sum(float(np.median(v)) for v in per_shape.values()) > budget_s:
            break
    return out


def _timed_pass(lins: list, xs: dict, sync: Callable[[], None]) -> dict[tuple[int, int], float]:
    totals: dict[tuple[int, int], float] = {}
    for shape, lin in lins:
        t = clock()
        lin(xs[shape[1]])
        sync()
        totals[shape] = totals.get(shape, 0.0) + clock() - t
    return totals


# ---- attention -------------------------------------------------------------------------------------

def decode_attention(model: ModelConfig, dtype: torch.dtype, quick: bool, repeats: int, op_s: float,
                     device: torch.device = torch.device("cpu")) -> tuple[float, float, float]:
    """Fit kvtier's paged decode attention as ``per_call + bytes / bandwidth + batch x per_sequence`` (+ op);
    return (bandwidth, per_sequence, per_call)."""
    from kvtier.kernels.attention import DecodePlan, paged_decode_attention

    bs, hkv, d = 16, model.num_kv_heads, model.head_dim
    grid = [(1, 64), (1, 512), (16, 128), (8, 1024)] if quick else [
        (1, 16), (1, 256), (1, 4096), (8, 64), (8, 1024), (16, 256), (32, 16), (32, 128), (32, 1024), (8, 4096)]
    xs, ys = [], []
    for b, ctx in grid:
        per_seq = -(-ctx // bs)
        layers = max(2, -(-3 * llc_bytes() // (2 * b * per_seq * hkv * bs * d * dtype.itemsize)))
        layers = min(layers, 8 if quick else 64)
        kv = torch.randn(layers, 2, b * per_seq, hkv, bs, d, dtype=dtype, device=device) * 0.1
        plan = DecodePlan(torch.arange(b * per_seq, device=device).view(b, per_seq),
                          torch.full((b,), ctx, device=device))
        q = torch.randn(b, model.num_heads, d, dtype=dtype, device=device)
        t = best_of(lambda kv=kv, q=q, plan=plan: [paged_decode_attention(q, kv[i, 0], kv[i, 1], plan, 0.1)
                                                   for i in range(kv.shape[0])], repeats, _sync(device)) / kv.shape[0]
        xs.append((2 * b * ctx * hkv * d * dtype.itemsize, b, 1.0))
        ys.append(max(t - op_s, 1e-9))
    coef = _nonneg_lstsq(np.array(xs, dtype=float), np.array(ys))
    return (1.0 / coef[0] if coef[0] > 0 else math.inf), float(coef[1]), float(coef[2])


CAUSAL_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)


def prefill_attention(model: ModelConfig, dtype: torch.dtype, quick: bool, repeats: int, op_s: float,
                      device: torch.device = torch.device("cpu")) -> tuple[list[int], list[float], float]:
    """Prefill attention: FLOP/s of causal chunks by length (from position 0), and FLOP/s of chunks
    after a cached prefix (counted over the whole masked square, as the kernel computes it)."""
    lengths = [64, 256] if quick else list(CAUSAL_LENGTHS)
    causal = [_prefill_rate(model, dtype, [(0, n)], False, repeats, op_s, device) for n in lengths]
    masked = [(256, 128)] if quick else [(256, 256), (1024, 512), (3072, 1024)]
    return lengths, causal, _prefill_rate(model, dtype, masked, True, repeats, op_s, device)


def _prefill_rate(model: ModelConfig, dtype: torch.dtype, points: list[tuple[int, int]], full: bool, repeats: int,
                  op_s: float, device: torch.device) -> float:
    from kvtier.kernels.attention import prefill_attention as run

    per_token = 4 * model.num_heads * model.head_dim
    flops, secs = 0.0, 0.0
    for start, n in points:
        q = torch.randn(n, model.num_heads, model.head_dim, dtype=dtype, device=device)
        if start:  # the engine gathers the cached prefix into [Hkv, total, D]
            k = torch.randn(model.num_kv_heads, start + n, model.head_dim, dtype=dtype, device=device)
        else:  # the engine passes the chunk's own K/V rows, [n, Hkv, D] viewed as [Hkv, n, D]
            k = torch.randn(n, model.num_kv_heads, model.head_dim, dtype=dtype, device=device).transpose(0, 1)
        secs += max(best_of(lambda q=q, k=k: run(q, k, k, 0.1), repeats, _sync(device)) - 2 * op_s, 1e-9)
        flops += per_token * n * ((start + n) if full else (n + 1) / 2)
    return flops / secs


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with coefficients >= 0 (scipy's NNLS), fitted on relative error."""
    from scipy.optimize import nnls

    w = 1.0 / np.maximum(y, 1e-12)
    coef, _ = nnls(a * w[:, None], y * w)
    return coef


# ---- engine overheads -------------------------------------------------------------------------------

def engine_overheads(hw_raw: dict, dtype: str, repeats: int) -> dict[str, float]:
    """Fit per-op, per-step and per-sequence overheads on random tiny-llama engines of 2 and 8 layers at
    batch 1, 4 and 16 (greedy sampling; the sampler is measured on its own)."""
    from kvtier.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine
    from kvtier.sampling_params import SamplingParams
    from kvtier.sim.cost_model import CostModel, StepShape
    from kvtier.sim.hardware import from_raw

    hw_raw = copy.deepcopy(hw_raw)  # the fit is of the whole of op, step and sequence: start them at zero
    proc = hw_raw["processors"]["device"]
    proc["overheads"] = {k: v for k, v in proc.get("overheads", {}).items() if k not in ("op", "step", "sequence")}
    rows, ys = [], []
    for layers in (2, 8):
        # a vocabulary of 512: the LM head and sampler stay negligible, so what is left is overhead
        engine = LLMEngine(EngineConfig(model="tiny-llama", load_format="dummy", dtype=dtype, max_model_len=512,
                                        hf_overrides={"num_hidden_layers": layers, "vocab_size": 512},
                                        num_kv_blocks=512))
        cost = CostModel(from_raw(hw_raw, "profile"), engine.model_config, dtype)
        for batch in (1, 4, 16):
            step_s = _decode_step_seconds(engine, batch, repeats, SamplingParams)
            tl = cost.step(StepShape([64] * batch))
            rows.append((tl.num_ops, 1.0, batch))
            ys.append(max(step_s - tl.makespan, 1e-6))
    op, step, seq = _nonneg_lstsq(np.array(rows, dtype=float), np.array(ys))
    return {"op": float(op), "step": float(step), "sequence": float(seq)}


LINEAR_OPS = ("qkv linear", "o linear", "gate_up linear", "down linear", "lm head")


def matmul_in_situ(hw_raw: dict, model_name: str, dtype: str, repeats: int) -> float:
    """``efficiency.matmul``: the linears' time by the matmul curves over their time inside the engine's
    decode steps of ``model_name`` (random weights of its shape, batch 1 and 8), with everything else
    in the step taken from the cost model; the median over the two batches, within [0.5, 1]."""
    from kvtier.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine
    from kvtier.sampling_params import SamplingParams
    from kvtier.sim.cost_model import CostModel, StepShape
    from kvtier.sim.hardware import from_raw

    engine = LLMEngine(EngineConfig(model=model_name, load_format="dummy", dtype=dtype, max_model_len=512,
                                    num_kv_blocks=256))
    cost = CostModel(from_raw(hw_raw, "profile"), engine.model_config, dtype)
    ratios = []
    for batch in (1, 8):
        step_s = _decode_step_seconds(engine, batch, repeats, SamplingParams)
        tl = cost.step(StepShape([76] * batch, num_sampled=batch))  # contexts 64..87 over the 24 steps
        linear = sum(tl.by_name[k] for k in LINEAR_OPS)
        ratios.append(linear / max(step_s - (tl.makespan - linear), 1e-9))
    return float(min(1.0, max(0.5, np.median(ratios))))


def _decode_step_seconds(engine, batch: int, repeats: int, params_cls) -> float:
    """Median seconds of the engine's decode steps at ``batch`` sequences (best of ``repeats`` runs)."""
    best = math.inf
    for r in range(repeats):
        for i in range(batch):
            engine.add_request(f"p{r}-{i}", None, params_cls(max_tokens=24, ignore_eos=True, temperature=0.0),
                               [5 + i] * 63)
        times = []
        while engine.has_unfinished_requests():
            t = clock()
            engine.step()
            times.append(clock() - t)
        best = min(best, float(np.median(times[2:])))
    return best


def sampling_costs(vocab: int, device: torch.device, repeats: int) -> dict[str, float]:
    """The engine's sampler: seconds per call, and per logit greedy and (on top of greedy) with temperature 1,
    from calls over 1 and 16 rows."""
    from kvtier.engine.sampler import sample
    from kvtier.sampling_params import SamplingParams

    def timed(rows: int, temp: float) -> float:
        logits = torch.randn(rows, vocab, device=device)
        params = [SamplingParams(temperature=temp)] * rows
        return best_of(lambda: sample(logits, params, [None] * rows), repeats, _sync(device))

    g1, g16, r16 = timed(1, 0.0), timed(16, 0.0), timed(16, 1.0)
    greedy = max(g16 - g1, 0.0) / (15 * vocab)
    return {"call": max(g1 - vocab * greedy, 0.0), "greedy": greedy, "random": max(r16 - g16, 0.0) / (16 * vocab)}


def matmul_call_overhead(device: torch.device, repeats: int) -> tuple[float, float]:
    """Seconds of a ``Linear`` call on a tiny weight: one row (GEMV), and more rows (packed GEMM)."""
    from kvtier.models.llama import Linear

    lin, calls = Linear(torch.randn(64, 64, device=device)), 50
    one = torch.randn(1, 64, device=device)
    few = [torch.randn(r, 64, device=device) for r in (2, 4, 8)]
    t1 = best_of(lambda: [lin(one) for _ in range(calls)], repeats, _sync(device)) / calls
    tn = float(np.median([best_of(lambda x=x: [lin(x) for _ in range(calls)], repeats, _sync(device)) / calls
                          for x in few]))
    return t1, tn


# ---- links (GPU machines) ---------------------------------------------------------------------------

def host_device_copies(device: torch.device, mib: int, repeats: int) -> dict[str, float]:
    """Pinned host<->device copy rates one way and both ways at once (sum), bytes/s."""
    n = mib * 2**20
    host_a = torch.empty(n, dtype=torch.uint8).pin_memory()
    host_b = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev_a = torch.empty(n, dtype=torch.uint8, device=device)
    dev_b = torch.empty(n, dtype=torch.uint8, device=device)
    sync = _sync(device)
    h2d = best_of(lambda: dev_a.copy_(host_a, non_blocking=True), repeats, sync)
    d2h = best_of(lambda: host_b.copy_(dev_b, non_blocking=True), repeats, sync)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def both():
        with torch.cuda.stream(s1):
            dev_a.copy_(host_a, non_blocking=True)
        with torch.cuda.stream(s2):
            host_b.copy_(dev_b, non_blocking=True)

    bi = best_of(both, repeats, sync)
    return {"h2d": n / h2d, "d2h": n / d2h, "both": 2 * n / bi}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def today() -> str:
    return datetime.date.today().isoformat()


def rate_text(x: float, unit: str) -> str:
    return format_rate(x, unit)
