"""Validate kvtier's simulator against the real engine on this machine.

    python benchmarks/validate_sim.py --clock cpu          # profile, grid, end to end (~15 min on 2 cores)
    python benchmarks/validate_sim.py --hardware local     # reuse the last `kvtier profile`
    python benchmarks/validate_sim.py --batches 1,8 --contexts 256,1024 --e2e-requests 0   # a quick look
    kvtier profile -m llama-3-8b && python benchmarks/validate_sim.py --hardware local --model llama-3-8b \
        --load-format dummy --e2e-requests 0           # on a GPU: Llama-3-8B shapes, random weights

Step times: the engine runs the default model on a grid (batch x context). For each context, the
largest batch is prefilled (the log records these prefill and mixed steps too; contexts above
``--real-prefill-max`` start from prompts marked as cached, whose KV blocks are zero, since a real
prefill of 32 x 4096 tokens takes over ten minutes here and decode time does not depend on KV
values), then decode-only steps are timed at each batch, aborting requests to go from the largest
batch to the smallest. Every logged step (its batch composition) is replayed in the cost model with
the profiled hardware file: per configuration the median decode step, and per step all of them,
give MAPE, signed bias (mean of (simulated - measured) / measured) and Kendall tau of the
configurations' order by speed.

End to end: the same Poisson requests (arrival times, prompt and output lengths) are served by the
engine in real time and by the simulator, with the same KV block count and batching limits;
throughput, mean TPOT, TTFT and end-to-end latency are compared.

Without ``--hardware`` the machine is profiled (``kvtier profile``, written to the cache dir) before the
grid and again before the end-to-end run: on a shared machine the neighbours' memory traffic drifts.
The end-to-end engine steps are also replayed one by one in the cost model, which tells the cost
model's own error apart from what queueing makes of it.

This machine is shared: steps are tagged with the CPU share other processes took while they ran
(/proc/stat); results are also reported over the steps with little interference. ``--clock cpu``
runs everything (profile, engine, serving) on one thread timed in its CPU time, and the end-to-end
run on a virtual clock advanced by each step's CPU time: what the engine would do on a core of its
own, whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import deque

import numpy as np
import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.sampling_params import SamplingParams
from kvtier.sim import machine_file
from kvtier.sim.cost_model import CostModel
from kvtier.sim.hardware import check_system, from_raw, load_system
from kvtier.sim.metrics import RequestRecord, summarize
from kvtier.sim.profile import ProfileOptions, clock, use_cpu_clock
from kvtier.sim.replay import shape_from_step_log
from kvtier.sim.report import write_json
from kvtier.sim.serving import ServingSimulator
from kvtier.sim.workload import poisson

BUSY_LIMIT = 0.15  # a step is "quiet" when other processes took less than this share of the CPUs


class CpuProbe:
    """CPU share other processes took since the last call (from /proc/stat and our own CPU time)."""

    def __init__(self):
        self.hz, self.ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
        self.last = self._now()

    def _now(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(vals) - vals[3] - vals[4]) / self.hz
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def share(self) -> float:
        now = self._now()
        wall, busy, own = (a - b for a, b in zip(now, self.last, strict=True))
        self.last = now
        return max(0.0, busy - own) / max(wall * self.ncpu, 1e-9)


def hardware(args) -> tuple:
    if args.hardware:
        return load_system(args.hardware), args.hardware
    print("profiling this machine (kvtier profile) ...", flush=True)
    raw = machine_file.profile_machine(ProfileOptions(repeats=args.repeats, say=lambda m: print("  " + m)))
    path = machine_file.write_hardware_file(raw, machine_file.default_path())
    return check_system(from_raw(raw, str(path))), str(path)


# ---- the step grid ----------------------------------------------------------------------------------

def _step(engine: LLMEngine, probe: CpuProbe, records: list, label) -> None:
    probe.share()
    t = clock()
    outs = engine.step()
    records.append({"log": engine.stats.step_log[-1], "sampled": len(outs), "label": label,
                    "measured": clock() - t, "other_cpu": probe.share()})


def _cache_prompt(engine: LLMEngine, rid: str, ctx: int) -> None:
    """Mark all but the last prompt token as already in the KV cache: the next step allocates and zeroes
    the blocks and runs a one-token chunk after the prefix. Decode steps read every KV byte whatever the
    values, so their time is the same as after a real prefill, without the prefill's minutes."""
    seq = engine.requests[rid].seqs[0]
    seq.num_computed_tokens = ctx - 1


def run_grid(engine: LLMEngine, batches: list[int], contexts: list[int], decode_steps: int,
             real_prefill_max: int) -> list[dict]:
    probe, records, vocab = CpuProbe(), [], engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    for ctx in contexts:
        rids = [f"c{ctx}-{i}" for i in range(max(batches))]
        for rid in rids:
            ids = torch.randint(100, vocab - 100, (ctx,), generator=g).tolist()
            engine.add_request(rid, None, SamplingParams(max_tokens=4096, ignore_eos=True), ids)
            if ctx > real_prefill_max:
                _cache_prompt(engine, rid, ctx)
        t = time.perf_counter()
        while not engine.stats.step_log or engine.stats.step_log[-1]["num_decode"] < len(rids) \
                or engine.stats.step_log[-1]["prefill_chunks"]:
            _step(engine, probe, records, ("prefill", ctx))
        how = "prefilled" if ctx <= real_prefill_max else "cached the prompts (zero KV) of"
        print(f"  context {ctx}: {how} {len(rids)} sequences in {time.perf_counter() - t:.0f} s", flush=True)
        for b in sorted(batches, reverse=True):
            while len(rids) > b:
                engine.abort_request(rids.pop())
            for _ in range(decode_steps):
                _step(engine, probe, records, (b, ctx))
        for rid in rids:
            engine.abort_request(rid)
    return records


def _mape(pred, meas) -> tuple[float, float]:
    rel = (np.asarray(pred) - np.asarray(meas)) / np.asarray(meas)
    return float(np.mean(np.abs(rel))), float(np.mean(rel))


def step_report(records: list[dict], cost: CostModel, block_size: int) -> dict:
    from scipy.stats import kendalltau

    for r in records:
        # every grid request samples with SamplingParams' default temperature (1.0): all sampled rows are random
        r["predicted"] = cost.seconds(shape_from_step_log(r["log"], block_size, r["sampled"], r["sampled"]))
    configs = sorted({r["label"] for r in records if r["label"][0] != "prefill"}, key=lambda x: (x[1], x[0]))
    rows = []
    print(f"\n{'batch':>5} {'context':>7} {'steps':>5} {'measured ms':>11} {'simulated ms':>12} {'error':>7} "
          f"{'other CPU':>9}")
    for label in configs:
        rs = [r for r in records if r["label"] == label]
        meas, pred = float(np.median([r["measured"] for r in rs])), float(np.median([r["predicted"] for r in rs]))
        busy = float(np.mean([r["other_cpu"] for r in rs]))
        rows.append({"batch": label[0], "context": label[1], "measured_s": meas, "simulated_s": pred,
                     "other_cpu": busy, "steps": len(rs)})
        print(f"{label[0]:>5} {label[1]:>7} {len(rs):>5} {meas * 1e3:>11.1f} {pred * 1e3:>12.1f} "
              f"{(pred - meas) / meas:>+7.1%} {busy:>9.0%}")
    out = {"configs": rows}
    mape, bias = _mape([r["simulated_s"] for r in rows], [r["measured_s"] for r in rows])
    tau = kendalltau([r["measured_s"] for r in rows], [r["simulated_s"] for r in rows]).statistic
    out.update(config_mape=mape, config_bias=bias, kendall_tau=float(tau))
    print(f"\nconfigurations (median decode step): MAPE {mape:.1%}, signed bias {bias:+.1%}, Kendall tau {tau:.3f}")
    for name, sel in (("all steps", lambda r: True), ("prefill and mixed steps", lambda r: r["label"][0] == "prefill"),
                      ("decode-only steps", lambda r: r["label"][0] != "prefill"),
                      (f"quiet steps (other CPU < {BUSY_LIMIT:.0%})", lambda r: r["other_cpu"] < BUSY_LIMIT)):
        rs = [r for r in records if sel(r)]
        if rs:
            m, b = _mape([r["predicted"] for r in rs], [r["measured"] for r in rs])
            out[name] = {"steps": len(rs), "mape": m, "bias": b}
            print(f"per step, {name}: {len(rs)} steps, MAPE {m:.1%}, signed bias {b:+.1%}")
    return out


# ---- end to end -------------------------------------------------------------------------------------

def serve_engine(engine: LLMEngine, specs, virtual: bool, steps: list) -> list[RequestRecord]:
    """Serve the requests in real time (or on a virtual clock advanced by each step's CPU time): each
    joins between steps once its arrival time has passed. ``steps`` gets (seconds, rows sampled) per step."""
    pending, records, t0, vt = deque(specs), {}, time.perf_counter(), 0.0
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(1)
    while pending or engine.has_unfinished_requests():
        now = vt if virtual else time.perf_counter() - t0
        while pending and pending[0].arrival_time <= now:
            s = pending.popleft()
            ids = rng.integers(100, vocab - 100, s.prompt_len).tolist()
            params = SamplingParams(max_tokens=s.output_len, ignore_eos=True, temperature=s.temperature)
            engine.add_request(s.request_id, None, params, ids)
            records[s.request_id] = RequestRecord(s.request_id, s.arrival_time, s.prompt_len)
        if not engine.has_unfinished_requests():
            if virtual:
                vt = pending[0].arrival_time
            else:
                time.sleep(max(0.0, pending[0].arrival_time - now))
            continue
        c = clock()
        outs = engine.step()
        took = clock() - c
        vt += took
        steps.append((took, len(outs)))
        t = vt if virtual else time.perf_counter() - t0
        for out in outs:
            rec = records[out.request_id]
            rec.token_times += [t] * (len(out.outputs[0].token_ids) - len(rec.token_times))
            if out.finished:
                rec.finished = t
                rec.num_preemptions = out.stats[0].num_preemptions
    return list(records.values())


def e2e_report(loaded, hw, args) -> dict:
    cfg = EngineConfig(**model_options(args), num_kv_blocks=args.e2e_blocks, max_num_seqs=args.e2e_max_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.e2e_max_model_len)
    specs = poisson(args.e2e_rate, args.e2e_requests, args.e2e_prompt_len, args.e2e_output_len, seed=0)
    sim = ServingSimulator(cfg, hw)
    simulated = summarize(sim.run(specs).records)
    print(f"\nend to end: {len(specs)} Poisson requests at {args.e2e_rate} req/s, {args.e2e_blocks} KV blocks; "
          f"simulated in advance, now serving them for real ...", flush=True)
    probe, steps = CpuProbe(), []
    engine = LLMEngine(cfg, loaded=loaded, log_steps=True)
    real = summarize(serve_engine(engine, specs, args.clock == "cpu", steps))
    busy = probe.share()
    out = {"engine": real, "simulator": simulated, "other_cpu": busy,
           "engine_steps": _replayed(engine.stats.step_log, steps, sim.cost, cfg.block_size)}
    print(f"{'metric':>22} {'engine':>10} {'simulator':>10} {'error':>8}")
    for name, key in (("output tok/s", ("output_throughput",)), ("requests/s", ("request_throughput",)),
                      ("TPOT mean ms", ("tpot_s", "mean")), ("TPOT p90 ms", ("tpot_s", "p90")),
                      ("TTFT mean ms", ("ttft_s", "mean")), ("E2E mean s", ("e2e_s", "mean")),
                      ("preemptions", ("num_preemptions",))):
        a, b = real, simulated
        for k in key:
            a, b = a[k], b[k]
        scale = 1e3 if name.endswith("ms") else 1.0
        err = (b - a) / a if a else float("nan")
        out[name] = {"engine": a, "simulator": b, "error": err}
        print(f"{name:>22} {a * scale:>10.2f} {b * scale:>10.2f} {err:>+8.1%}")
    print(f"other processes took {busy:.0%} of the CPUs during the engine run")
    return out


def _replayed(log: list[dict], steps: list, cost: CostModel, block_size: int) -> dict:
    """The engine's own steps of the end-to-end run, replayed one by one in the cost model: separates the
    cost model's error from what it does to the schedule (queueing amplifies a per-step bias near saturation)."""
    meas = np.array([s for s, _ in steps])
    pred = np.array([cost.seconds(shape_from_step_log(e, block_size, n, n)) for e, (_, n) in zip(log, steps,
                                                                                                  strict=True)])
    busy = float(meas.sum())
    mape, bias = _mape(pred, meas)
    print(f"the engine's {len(meas)} steps replayed in the cost model: MAPE {mape:.1%}, signed bias {bias:+.1%}, "
          f"busy {busy:.1f} s measured vs {pred.sum():.1f} s simulated")
    return {"steps": len(meas), "mape": mape, "bias": bias, "busy_s": busy, "simulated_busy_s": float(pred.sum())}


def model_options(args) -> dict:
    return dict(model=args.model, load_format=args.load_format, dtype=args.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardware", default=None, help="hardware file or 'local' (default: profile now)")
    ap.add_argument("--model", default="default", help="the engine's --model (a named shape with --load-format dummy)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on a CPU, bfloat16 on a GPU")
    ap.add_argument("--repeats", type=int, default=5, help="profile: best of N")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--decode-steps", type=int, default=6, help="timed decode steps per configuration")
    ap.add_argument("--real-prefill-max", type=int, default=1024,
                    help="longer contexts start from cached (zero) prompts instead of a real prefill")
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--e2e-requests", type=int, default=48, help="0 skips the end-to-end comparison")
    ap.add_argument("--e2e-rate", type=float, default=0.3,
                    help="requests per second (0.3: the engine busy about 80% of the time with --clock cpu)")
    ap.add_argument("--e2e-prompt-len", default="64-512")
    ap.add_argument("--e2e-output-len", default="32-128")
    ap.add_argument("--e2e-blocks", type=int, default=200, help="KV blocks of both engine and simulator")
    ap.add_argument("--e2e-max-model-len", type=int, default=1024)
    ap.add_argument("--e2e-max-seqs", type=int, default=16)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one thread timed in its CPU time (robust on a shared machine)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    if args.clock == "cpu":
        torch.set_num_threads(1)
        use_cpu_clock(True)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]  # empty: no grid
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]

    print(f"machine: {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.clock} clock")
    hw, hw_path = hardware(args)
    print(f"hardware file: {hw_path}")
    b_max, c_max = max(batches, default=1), max(contexts, default=16)
    blocks = b_max * math.ceil((c_max + 4 * args.decode_steps + 4 * b_max) / 16) + 64
    blocks = max(blocks, 8192 // 16)  # the engine wants room for one sequence of the model's whole context
    engine = LLMEngine(EngineConfig(**model_options(args), num_kv_blocks=blocks, max_num_seqs=b_max,
                                    max_num_batched_tokens=args.max_num_batched_tokens), log_steps=True)
    dtype = str(engine.loaded.model.dtype).removeprefix("torch.")
    print(f"engine: {engine.loaded.name} on {engine.runner.device}, {dtype}", flush=True)
    results = {"hardware": hw_path}
    if batches and contexts:
        print(f"step grid: batches {batches} x contexts {contexts}, {args.decode_steps} decode steps each", flush=True)
        records = run_grid(engine, batches, contexts, args.decode_steps, args.real_prefill_max)
        cost = CostModel(hw, engine.model_config, dtype, engine.config.block_size)
        results["steps"] = step_report(records, cost, engine.config.block_size)
        results["step_records"] = [{k: v for k, v in r.items() if k != "log"} | {"log": r["log"]} for r in records]
    loaded = engine.loaded
    del engine
    if args.e2e_requests:
        if not args.hardware and batches and contexts:  # neighbours' load drifts: measure again, as things are now
            hw, hw_path = hardware(args)
            results["hardware_e2e"] = hw_path
        results["e2e"] = e2e_report(loaded, hw, args)
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
