"""Decode steps with part of the KV cache in host memory, against the plain cache, measured and simulated.

    python benchmarks/bench_offload.py                                        # default model, this machine
    python benchmarks/bench_offload.py --model llama-3-8b --load-format dummy --batch 8 --context 4096 \\
        --hardware local                                                      # on a GPU, after kvtier profile
    python benchmarks/bench_offload.py --hardware h100-sxm --host ddr5-genoa  # a preset's prediction beside

Every policy runs the same batch of ``--batch`` sequences of ``--context`` tokens, whose prompts are
marked as already cached (their KV blocks are zero: a decode step reads every byte whatever the
values, and a real prefill of long prompts takes minutes on a CPU). ``static`` gets a device tier
of ``1 - --host-share`` of the working set, the rest in the host tier (pinned memory on a GPU, where
decode attention fetches those blocks one layer ahead: ``kv/fetch.py``). Each row: the median of
``--steps`` timed decode steps, its ratio to ``plain`` in the same run, the KV bytes read from
the host per step and the rate they crossed at. With ``--hardware`` (a preset or a hardware file,
``local`` for the last ``kvtier profile``) the same steps are replayed in the simulator's cost model
(``--offload fetch``) and its prediction printed beside each.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.sampling_params import SamplingParams


def timed_steps(engine: LLMEngine, batch: int, context: int, steps: int) -> tuple[list[float], list[dict]]:
    """Decode ``steps`` steps of ``batch`` cached prompts of ``context`` tokens: (seconds, step logs)."""
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    for i in range(batch):
        ids = torch.randint(100, vocab - 100, (context,), generator=g).tolist()
        engine.add_request(f"r{i}", None, SamplingParams(max_tokens=steps + 8, ignore_eos=True), ids)
        engine.requests[f"r{i}"].seqs[0].num_computed_tokens = context - 1  # cached: zero KV blocks
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    for _ in range(3):  # the one-token prefills, then warm-up decodes
        engine.step()
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t)
    return times, engine.stats.step_log[-steps:]


def simulated(hw, engine: LLMEngine, logs: list[dict], dtype: str) -> float:
    """Median cost-model time of the logged steps, the KV of each tier as the engine read it."""
    from kvtier.sim.cost_model import CostModel
    from kvtier.sim.replay import shape_from_step_log

    cost = CostModel(hw, engine.model_config, dtype, engine.config.block_size, "fetch")
    per_token = engine.layout.token_bytes
    times = []
    for log in logs:
        shape = shape_from_step_log(log, engine.config.block_size, log["num_decode"])
        tiers = {t: n // per_token for t, n in log["kv"]["bytes_read"].items()}
        times.append(cost.seconds(dataclasses.replace(shape, decode_tokens_by_tier=tiers)))
    return float(np.median(times))


def hardware(name: str, host: str | None):
    """The hardware to replay on, refused now without a host tier linked to the device (a CPU's machine file)."""
    from kvtier.sim.errors import HardwareError
    from kvtier.sim.hardware import load_system

    try:
        hw = load_system(name, host)
        hw.tier("host"), hw.link("host", "device")
    except HardwareError as e:
        raise SystemExit(f"error: {e}") from None
    return hw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--host-share", type=float, default=0.33, help="share of the working set in the host tier")
    ap.add_argument("--policies", default="plain,static")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hardware", default=None, help="also replay the steps in the cost model on this hardware")
    ap.add_argument("--host", default=None, help="a host preset or file joined to a device --hardware")
    a = ap.parse_args()
    hw = hardware(a.hardware, a.host) if a.hardware else None
    bs = 16
    per_seq = -(-(a.context + a.steps + 8) // bs)
    work = a.batch * per_seq
    base = dict(model=a.model, load_format=a.load_format, dtype=a.dtype, block_size=bs, max_num_seqs=a.batch,
                max_model_len=per_seq * bs)
    device = int(work * (1 - a.host_share)) + a.batch  # + the blocks new tokens open
    tiered = dict(kv_tiers=f"device={device}blocks,host={work}blocks")
    tiers = {"plain": dict(num_kv_blocks=work + a.batch), "static": tiered, "dynamic": tiered}
    loaded, plain_s = None, None
    print(f"{'policy':8} {'step ms':>8} {'x plain':>8} {'host MB/step':>12} {'host GB/s':>9} {'simulated ms':>12}")
    for name in a.policies.split(","):
        engine = LLMEngine(EngineConfig(**base, kv_policy=name, **tiers[name]), loaded=loaded, log_steps=True)
        loaded = engine.loaded
        times, logs = timed_steps(engine, a.batch, a.context, a.steps)
        step = float(np.median(times))
        plain_s = plain_s or step
        host = float(np.median([log["kv"]["bytes_read"].get("host", 0) for log in logs]))
        extra = step - plain_s
        rate = f"{host / extra / 1e9:9.1f}" if host and extra > 0 else f"{'-':>9}"
        dtype = str(loaded.model.dtype).removeprefix("torch.")
        sim = f"{simulated(hw, engine, logs, dtype) * 1e3:12.1f}" if a.hardware else f"{'-':>12}"
        print(f"{name:8} {step * 1e3:8.1f} {step / plain_s:8.2f} {host / 1e6:12.1f} {rate} {sim}", flush=True)
        del engine


if __name__ == "__main__":
    main()
