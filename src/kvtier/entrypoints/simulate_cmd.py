"""``kvtier simulate``: what a model, a KV policy and a workload do on hardware you may not have.

``serve`` runs the engine's scheduler and KV policy over Poisson arrivals or a JSONL trace with a
simulated clock (a comma list of rates sweeps and plots); ``step`` shows the time of one batch
composition and where it goes (per stream, per op; sweeps batch x context and plots); ``hardware``
lists the presets or shows one file, validated; ``placement`` is the KV placement study
(``placement_cmd.py``).
"""

from __future__ import annotations

import click

from kvtier.entrypoints.options import ENGINE_OPTIONS, engine_config
from kvtier.entrypoints.placement_cmd import placement

SIM_ENGINE_OPTIONS = ("model", "dtype", "max_model_len", "block_size", "kv_cache_memory", "num_kv_blocks",
                      "kv_tiers", "kv_policy", "kv_policy_options", "max_num_seqs", "max_num_batched_tokens",
                      "hf_overrides")


def sim_engine_options(f):
    """The engine options that mean something to the simulator, with the engine's names and defaults."""

    def probe():
        pass

    for option in ENGINE_OPTIONS:
        probe = option(probe)
    picked = [p for p in reversed(probe.__click_params__) if p.name in SIM_ENGINE_OPTIONS]
    f.__click_params__ = getattr(f, "__click_params__", []) + picked  # how click's decorators attach options
    return f


def hardware_options(f):
    opts = [
        click.option("--hardware", "-H", default="h100-sxm", show_default=True,
                     help="a preset, a hardware file (.yaml/.json), or 'local' (written by kvtier profile)"),
        click.option("--host", default=None, help="a host preset or file joined to a device file (e.g. ddr5-genoa)"),
        click.option("--offload", type=click.Choice(["fetch", "direct", "cpu"]), default="fetch", show_default=True,
                     help="how attention reads KV outside device memory: copy ahead, read in place, or on the CPU"),
        click.option("--prefetch-depth", type=int, default=1, show_default=True,
                     help="layers ahead that KV copies may start"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _simulator(kw: dict, policy: str | None = None):
    from kvtier.sim.hardware import load_system
    from kvtier.sim.serving import ServingSimulator

    hw = load_system(kw["hardware"], kw["host"])
    config = engine_config({**kw, "kv_policy": policy or kw["kv_policy"]})
    return ServingSimulator(config, hw, offload=kw["offload"], prefetch_depth=kw["prefetch_depth"])


def _policies(text: str) -> list[str]:
    """``--kv-policy`` in ``serve`` may be a comma list: one run per technique, side by side."""
    from kvtier.kv.policies import POLICY_REGISTRY
    from kvtier.utils.choices import comma_choices

    return comma_choices(text, sorted(POLICY_REGISTRY), "KV policy", "--kv-policy")


def _rates(text: str) -> list[float]:
    from kvtier.errors import ConfigError

    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"cannot read --rate '{text}'", "write requests per second, e.g. 2 or 1,2,4,inf") from e
    if not rates or any(not r > 0 for r in rates):
        raise ConfigError(f"--rate needs positive numbers, got '{text}'", "e.g. --rate 1,2,4 or --rate inf")
    return rates


@click.group()
def simulate():
    """Predict serving and step times on described hardware (the engine's scheduler, a simulated clock)."""


simulate.add_command(placement)  # the KV placement study (arXiv 2508.13231), in its own module


@simulate.command()
@hardware_options
@sim_engine_options
@click.option("--rate", "rate_text", default="4", show_default=True,
              help="requests per second (Poisson); a comma list sweeps; inf sends all at once")
@click.option("--num-requests", type=int, default=200, show_default=True)
@click.option("--prompt-len", default="128-1024", show_default=True, help="tokens: N or LOW-HIGH (uniform)")
@click.option("--output-len", default="64-256", show_default=True, help="tokens: N or LOW-HIGH (uniform)")
@click.option("--seed", type=int, default=0, show_default=True, help="workload seed")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="sampling temperature of every request (0: greedy; SamplingParams' default is 1.0)")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="replay a JSONL trace (arrival_time, prompt_len, output_len) instead of Poisson arrivals")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of throughput and latencies against the rate (for a sweep)")
def serve(rate_text, num_requests, prompt_len, output_len, seed, temperature, trace, json_path, plot_path, **kw):
    """Simulate serving a workload: TTFT, TPOT, ITL, end-to-end latency, throughput, memory and links.
    ``--kv-policy a,b,c`` compares techniques on the same requests."""
    from rich.console import Console

    from kvtier.sim import report, workload
    from kvtier.utils.progress import progress_bar

    console = Console(stderr=True)
    rates = [None] if trace else _rates(rate_text)
    policies = _policies(kw["kv_policy"])
    rows, sims = [], {}
    for policy, rate in progress_bar([(p, r) for p in policies for r in rates], "simulating"):
        sim = sims[policy] = _simulator(kw, policy=policy)
        reqs = workload.load_trace(trace) if trace else workload.poisson(rate, num_requests, prompt_len,
                                                                          output_len, seed, temperature)
        row = sim.run(reqs).summary()
        row.update(rate=rate, policy=policy, num_kv_blocks=sim.num_blocks)
        rows.append(row)
    hw_name, model, dtype = sim.hw.name, kw["model"], sim.dtype
    title = f"{model} ({dtype}) on {hw_name}, " + ", ".join(f"{p}: {s.num_blocks} KV blocks" for p, s in sims.items())
    Console(width=max(120, Console().width)).print(report.serving_table(rows, title))
    for policy in policies:
        last = [r for r in rows if r["policy"] == policy][-1]
        for line in report.memory_lines(last):
            console.print(f"{policy}: {line}" if len(policies) > 1 else line)
    if json_path:
        report.write_json({"hardware": hw_name, "model": model, "dtype": dtype, "runs": rows}, json_path)
    if plot_path:
        from kvtier.sim.plots import plot_rate_sweep

        swept = [r for r in rows if r["rate"] is not None]
        console.print(f"plot: {plot_rate_sweep(swept, plot_path, f'{model} ({dtype}) on {hw_name}')}")


def _ints(text: str, what: str) -> list[int]:
    from kvtier.errors import ConfigError

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"cannot read --{what} '{text}'", "write integers, e.g. 1,8,32") from e
    if not vals or min(vals) < 1:
        raise ConfigError(f"--{what} needs integers >= 1, got '{text}'")
    return vals


@simulate.command()
@hardware_options
@sim_engine_options
@click.option("--batch", default="1,8,32", show_default=True, help="decode sequences (comma list sweeps)")
@click.option("--context", default="256,1024,4096", show_default=True, help="tokens per sequence (comma list)")
@click.option("--prefill", type=int, default=0, help="also prefill a fresh chunk of N tokens in the same step")
@click.option("--host-share", type=float, default=0.0, show_default=True,
              help="share of each decode's KV held in the host tier (needs a host: --host or a machine file)")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="sampling temperature (0: greedy)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG of step time against context, one line per batch")
@click.option("--timeline", "timeline_path", type=click.Path(dir_okay=False), default=None,
              help="PNG Gantt chart of the last configuration's step (first layers)")
def step(batch, context, prefill, host_share, temperature, json_path, plot_path, timeline_path, **kw):
    """Time one step per batch x context and show where the last one's time goes."""
    from rich.console import Console

    from kvtier.errors import ConfigError
    from kvtier.sim import report
    from kvtier.sim.cost_model import StepShape

    if not 0.0 <= host_share <= 1.0:
        raise ConfigError(f"--host-share must be within [0, 1], got {host_share}")
    sim = _simulator(kw)
    points, tl = [], None
    for b in _ints(batch, "batch"):
        for ctx in _ints(context, "context"):
            host = int(b * ctx * host_share)
            chunks = [(0, prefill)] if prefill else []
            rows = b + len(chunks)
            shape = StepShape([ctx] * b, chunks, rows, rows if temperature > 0 else 0,
                              decode_tokens_by_tier={"device": b * ctx - host, "host": host} if host else None)
            tl = sim.cost.step(shape, record=True)
            points.append({"batch": b, "context": ctx, "seconds": tl.makespan, "tokens_per_s": b / tl.makespan,
                           "timeline": tl.summary()})
    console = Console(stderr=True)
    title = f"{kw['model']} ({sim.dtype}) on {sim.hw.name}"
    table = report.step_points_table(points, title)
    Console(width=max(100, Console().width)).print(table)
    last = points[-1]
    Console(width=max(100, Console().width)).print(
        report.step_table(last["timeline"], f"batch {last['batch']} x context {last['context']}: where the time goes"))
    if json_path:
        report.write_json({"hardware": sim.hw.name, "model": kw["model"], "dtype": sim.dtype, "points": points},
                          json_path)
    if plot_path:
        from kvtier.sim.plots import plot_context_sweep

        console.print(f"plot: {plot_context_sweep(points, plot_path, title)}")
    if timeline_path:
        from kvtier.sim.plots import plot_timeline

        console.print(f"timeline: {plot_timeline(tl.spans, timeline_path, title + ', one step')}")


@simulate.command()
@click.argument("spec", required=False)
@click.option("--host", default=None, help="a host preset or file to join to SPEC")
def hardware(spec, host):
    """List the presets, or validate and show SPEC (a preset, a file, or 'local')."""
    from rich.console import Console

    from kvtier.sim import report
    from kvtier.sim.hardware import load_system, preset_names, read_raw

    console = Console()
    if spec is None:
        rows = []
        for name in preset_names():
            raw, _ = read_raw(name)
            rows.append((name, raw["role"], raw.get("description", "")))
        console.print(report.hardware_table(rows))
        return
    hw = load_system(spec, host) if host or read_raw(spec)[0].get("role") != "host" else None
    if hw is None:
        from kvtier.sim.hardware import load_hardware

        hw = load_hardware(spec)
    for line in report.hardware_lines(hw):
        console.print(line)
