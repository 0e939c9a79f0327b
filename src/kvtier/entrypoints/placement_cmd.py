"""``kvtier simulate placement``: the KV placement study (arXiv 2508.13231) on a recorded or synthetic
attention trace: throughput per policy, the annealing and LP bounds, sweeps and plots."""

from __future__ import annotations

import click

from kvtier.errors import ConfigError

SWEEP_DEFAULTS = {"sparsity": "0.3,0.5,0.6,0.7,0.8,0.9,0.95", "variation": "0,0.1,0.3,0.5,0.7,0.9,1",
                  "capacity": "2GB,4GB,6GB,8GB,12GB,16GB,24GB"}
SYNTHETIC_KEYS = ("variation", "spread", "sink", "recency", "recent_units", "seed", "sparsity")


def _pairs(text: str | None, what: str, allowed: tuple[str, ...]) -> dict:
    """``a=1,b=2`` -> {a: 1.0, b: 2.0}, keys checked, numbers parsed."""
    out = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"cannot read '{item}' in {what}",
                              f"write KEY=VALUE with KEY one of: {', '.join(allowed)}")
        try:
            out[key] = float(value)
        except ValueError as e:
            raise ConfigError(f"{what}: {key} must be a number, got '{value}'", f"e.g. {key}=0.5") from e
    return out


def _values(kind: str, text: str | None) -> list[float]:
    from kvtier.sim.units import parse_quantity

    text = text or SWEEP_DEFAULTS[kind]
    try:
        vals = [parse_quantity(v, "bytes") if kind == "capacity" else float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"cannot read --values '{text}' for --sweep {kind}: {e}",
                    f"e.g. --values {SWEEP_DEFAULTS[kind]}") from e
    if not vals:
        raise ConfigError(f"--values '{text}' has no values", f"e.g. --values {SWEEP_DEFAULTS[kind]}")
    return vals


def _online_options(pairs: tuple[str, ...]) -> dict:
    """The engine's own option check (``make_policy``) on numbers read from KEY=VALUE pairs."""
    from kvtier.kv.policies import make_policy

    allowed = ("decay", "max_moves", "hysteresis", "pin_first", "pin_recent")
    opts = _pairs(",".join(pairs), "--online-option", allowed)
    opts = {k: int(v) if k in ("max_moves", "pin_first", "pin_recent") else v for k, v in opts.items()}
    make_policy("dynamic", opts)
    return opts


def _hbm_kv(text: str | None, machine, workload) -> float:
    from kvtier.sim.errors import CapacityError
    from kvtier.sim.units import parse_quantity

    if text is None:
        kv = machine.hbm_capacity - workload.stored_weight_bytes
        if kv <= 0:
            raise CapacityError(f"{workload.model}'s weights ({workload.stored_weight_bytes / 1e9:.1f} GB) fill "
                                f"{machine.name}'s HBM ({machine.hbm_capacity / 1e9:.1f} GB)",
                                "pass --hbm-kv SIZE or a larger device")
        return kv
    try:
        kv = parse_quantity(text, "bytes")
    except ValueError as e:
        raise ConfigError(f"cannot read --hbm-kv '{text}': {e}", "e.g. --hbm-kv 8GB") from e
    if kv < 0:
        raise ConfigError(f"--hbm-kv must be >= 0, got '{text}'", "e.g. --hbm-kv 8GB")
    return kv


def _traces(kw: dict, grid):
    """The trace, a maker of synthetic traces by variation (None for a recorded trace), and the
    sparsity --synthetic asked for (None: not given)."""
    from dataclasses import replace

    from kvtier.sim.placement.recorded import load_recording, scale_recording
    from kvtier.sim.placement.synthetic import SyntheticSpec, synthetic_trace

    if kw["trace"] and kw["synthetic"]:
        raise ConfigError("--trace and --synthetic both given", "study one trace: a recorded file or a synthetic one")
    if kw["trace"]:
        return scale_recording(load_recording(kw["trace"]), grid), None, None
    spec = _pairs(kw["synthetic"], "--synthetic", SYNTHETIC_KEYS)
    sparsity = spec.pop("sparsity", None)
    base = SyntheticSpec(**{k: int(v) if k == "seed" else v for k, v in spec.items()})
    return synthetic_trace(grid, base), lambda v: synthetic_trace(grid, replace(base, variation=v)), sparsity


def _problem(kw: dict):
    from kvtier.sim.hardware import load_system
    from kvtier.sim.model_shape import model_shape
    from kvtier.sim.placement.model import Problem, machine_from_hardware, workload_for
    from kvtier.sim.placement.traces import Grid

    machine = machine_from_hardware(load_system(kw["hardware"], kw["host"]))
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[kw["dtype"]]
    workload = workload_for(model_shape(kw["model_shape"]), kw["model_shape"], itemsize, kw["batch"])
    grid = Grid(kw["prompt_tokens"], kw["decode_tokens"], kw["unit_tokens"], kw["step_stride"], kw["layer_groups"])
    trace, trace_for, sparsity = _traces(kw, grid)
    if sparsity is not None and kw["sparsity"] is not None and sparsity != kw["sparsity"]:
        raise ConfigError(f"--sparsity {kw['sparsity']} and --synthetic sparsity={sparsity} disagree",
                          "give one of them")
    sparsity = sparsity if sparsity is not None else (0.5 if kw["sparsity"] is None else kw["sparsity"])
    return Problem(trace, machine, workload, _hbm_kv(kw["hbm_kv"], machine, workload), sparsity), trace_for


def _describe(p) -> str:
    w, tr = p.workload, p.trace
    n, g, u = tr.shape
    return (f"{w.model} x batch {w.batch} on {p.machine.name}: {tr.prompt_tokens}+{int(tr.steps.sum())} tokens; "
            f"weights {w.stored_weight_bytes / 1e9:.2f} GB; HBM for KV {p.hbm_kv / 1e9:.2f} GB = {p.slots} of "
            f"{g * u} units ({tr.unit_tokens} tokens x {p.layers_per_group} layers); {n} steps of "
            f"{int(tr.steps[0])} decode steps; sparsity {p.sparsity:g}; trace: {tr.source}")


def _run(p, trace_for, kw: dict):
    from kvtier.sim.placement.study import Settings, policy_names, run, sweep
    from kvtier.utils.progress import progress_counter

    names = policy_names(kw["policies"])
    settings = Settings(kw["seed"], _online_options(kw["online_option"]), kw["online_signal"],
                        kw["lp_window"] or None)
    if kw["sweep"] == "variation" and trace_for is None:
        raise ConfigError("--sweep variation needs a synthetic trace", "drop --trace (or sweep sparsity or capacity)")
    values = _values(kw["sweep"], kw["values"]) if kw["sweep"] else []
    with progress_counter("placement study", len(names) * max(1, len(values))) as advance:
        if not kw["sweep"]:
            return run(p, names, settings, advance)
        return sweep(p, kw["sweep"], values, names, settings, trace_for, advance)


def _show(p, rows: list[dict], kw: dict) -> None:
    from rich.console import Console

    from kvtier.sim.placement import report

    out, err = Console(width=max(150, Console().width)), Console(stderr=True)
    out.print(_describe(p))
    if kw["sweep"]:
        out.print(report.sweep_table(rows, kw["sweep"], f"throughput / static vs {kw['sweep']}"))
    else:
        out.print(report.results_table(rows, "KV placement: decode throughput per policy"))
        for line in report.summary_lines(p, rows):
            out.print(line)
    if kw["json_path"]:
        from kvtier.sim.report import write_json

        write_json({"problem": _describe(p), "sweep": kw["sweep"], "rows": rows}, kw["json_path"])
    if kw["plot_dir"] and kw["sweep"]:
        from pathlib import Path

        from kvtier.sim.placement.plots import plot_sweep

        Path(kw["plot_dir"]).mkdir(parents=True, exist_ok=True)
        path = Path(kw["plot_dir"]) / f"placement_{kw['sweep']}.png"
        title = (f"{p.workload.model} x{p.workload.batch} on {p.machine.name}, HBM for KV {p.hbm_kv / 1e9:.2f} GB, "
                 f"sparsity {p.sparsity:g}: {p.trace.source.split(' (')[0]}")
        err.print(f"plot: {plot_sweep(rows, kw['sweep'], path, title)}")


@click.command()
@click.option("--hardware", "-H", default="gh200-paper", show_default=True,
              help="a machine with device (HBM) and host (off-package) tiers and a link, or a device file + --host")
@click.option("--host", default=None, help="a host preset or file joined to a device file")
@click.option("--model-shape", "-m", default="llama-3.1-8b", show_default=True, help="a named shape or config.json")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="a kvtier attention trace (kvtier generate --trace FILE), scaled to the model and workload")
@click.option("--synthetic", default=None, metavar="KEY=VALUE,...",
              help=f"a synthetic trace (the default): {', '.join(SYNTHETIC_KEYS)}")
@click.option("--sparsity", type=float, default=None, help="share of the KV a step does not read  [default: 0.5]")
@click.option("--prompt-tokens", type=int, default=30000, show_default=True)
@click.option("--decode-tokens", type=int, default=10000, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True, help="sequences decoding together, alike")
@click.option("--hbm-kv", default=None, help="HBM for the batch's KV, e.g. 8GB  [default: HBM minus weights]")
@click.option("--unit-tokens", type=int, default=256, show_default=True, help="tokens per placement unit")
@click.option("--step-stride", type=int, default=10, show_default=True, help="decode steps per simulated step")
@click.option("--layer-groups", type=int, default=8, show_default=True, help="layer groups (divides the layers)")
@click.option("--policies", default=",".join(("unlimited", "static", "reactive", "page-16", "annealing", "online",
                                             "lp")), show_default=True, help="comma list; also all-hbm")
@click.option("--online-option", multiple=True, metavar="KEY=VALUE", help="a DynamicPolicy option (repeatable)")
@click.option("--online-signal", type=click.Choice(["reads", "mass"]), default="reads", show_default=True,
              help="what the online policy observes per unit: the steps that read it, or its attention mass")
@click.option("--lp-window", type=int, default=5, show_default=True,
              help="simulated steps per LP window (0: one LP over the run)")
@click.option("--seed", type=int, default=0, show_default=True, help="simulated annealing's seed")
@click.option("--sweep", type=click.Choice(["sparsity", "variation", "capacity"]), default=None)
@click.option("--values", default=None, help="the swept values (comma list; capacity in bytes, e.g. 4GB,8GB)")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None, help="write sweep plots here")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the results here")
def placement(**kw):
    """Where should KV live, HBM or off-package memory? Throughput per placement policy on an attention
    trace, against static placement, unlimited HBM and an LP lower bound (see docs/placement.md)."""
    p, trace_for = _problem(kw)
    rows = _run(p, trace_for, kw)
    _show(p, rows, kw)
