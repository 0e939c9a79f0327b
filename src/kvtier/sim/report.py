"""Tables (rich) and JSON for simulation results."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kvtier.sim.units import format_rate, format_seconds
from kvtier.utils.units import format_bytes


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def serving_table(rows: list[dict], title: str):
    """One row per simulated run (``SimResult.summary()`` plus ``rate`` and ``policy``)."""
    from rich.table import Table

    t = Table(title=title)
    cols = ("KV policy", "rate req/s", "req/s", "out tok/s", "TTFT mean ms", "TTFT p99 ms", "TPOT mean ms",
            "TPOT p99 ms", "ITL p99 ms", "E2E p50 s", "preempt", "device busy")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        rate = r.get("rate")
        t.add_row(r.get("policy", "-"), "-" if rate is None else ("inf" if math.isinf(rate) else f"{rate:g}"),
                  f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.1f}",
                  _ms(r["ttft_s"]["mean"]), _ms(r["ttft_s"]["p99"]), _ms(r["tpot_s"]["mean"]), _ms(r["tpot_s"]["p99"]),
                  _ms(r["itl_s"]["p99"]), f"{r['e2e_s']['p50']:.2f}", str(r["num_preemptions"]),
                  f"{100 * r['utilization'].get('device', 0.0):.0f}%")
    return t


def memory_lines(summary: dict) -> list[str]:
    lines = []
    for tier, u in summary["memory"].items():
        lines.append(f"tier {tier}: capacity {format_bytes(u['capacity'])}, weights {format_bytes(u['weights'])}, "
                     f"KV pool {format_bytes(u['kv_pool'])}, KV peak {format_bytes(u['kv_peak'])}, "
                     f"KV mean {format_bytes(u['kv_mean'])}")
    for stream, share in summary["utilization"].items():
        if ":" in stream:
            lines.append(f"link {stream}: busy {100 * share:.1f}% of the run")
    return lines


def step_table(summary: dict, title: str):
    """Where a step's time goes: busy and stalled time per stream, then seconds per kind of op."""
    from rich.table import Table

    t = Table(title=title)
    for c in ("stream / op", "busy", "waiting", "share of step"):
        t.add_column(c, justify="left" if c.startswith("stream") else "right")
    total = summary["seconds"] or 1.0
    for stream, s in summary["streams"].items():
        t.add_row(f"[bold]{stream}[/bold]", format_seconds(s["busy_s"]), format_seconds(s["stall_s"]),
                  f"{100 * s['busy_s'] / total:.0f}%")
    for name, secs in summary["ops"].items():
        t.add_row(f"  {name}", format_seconds(secs), "", f"{100 * secs / total:.0f}%")
    return t


def hardware_table(items: list[tuple[str, str, str]]):
    from rich.table import Table

    t = Table(title="hardware presets (kvtier simulate --hardware NAME [--host NAME])")
    for c in ("name", "role", "description"):
        t.add_column(c)
    for row in items:
        t.add_row(*row)
    return t


def hardware_lines(hw) -> list[str]:
    lines = [f"{hw.name}: {hw.description}"]
    for p in hw.processors.values():
        peaks = ", ".join(f"{d} {format_rate(f, 'FLOP/s')}" for d, f in p.peak_flops.items())
        curves = ", ".join(f"{d} measured at {len(cs)} weight shapes" for d, cs in p.curves.items())
        lines.append(f"processor {p.name} ({p.kind}) on tier {p.memory}: {peaks or curves}")
    for t in hw.memory.values():
        lines.append(f"tier {t.name}: {format_bytes(t.capacity)}, read {format_rate(t.read_bw)}, "
                     f"write {format_rate(t.write_bw)}")
    for lk in hw.links.values():
        both = f", both ways {format_rate(lk.both)}" if lk.both else ", full duplex"
        lines.append(f"link {lk.name}: {lk.a}>{lk.b} {format_rate(lk.forward)}, {lk.b}>{lk.a} "
                     f"{format_rate(lk.backward)}{both}, latency {format_seconds(lk.latency)}")
    return lines


def _plain(x):
    """JSON-safe: infinities as "inf", tuples as lists, unknown objects as strings."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x if x is None or isinstance(x, (str, int, float, bool)) else str(x)


def write_json(obj, path: str | Path) -> None:
    Path(path).write_text(json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n")


def step_points_table(points: list[dict], title: str):
    """One row per batch x context: step time, decode tokens/s, and how long the device waited."""
    from rich.table import Table

    t = Table(title=title)
    for c in ("batch", "context", "step ms", "tokens/s", "device waiting ms", "ops"):
        t.add_column(c, justify="right")
    for p in points:
        dev = p["timeline"]["streams"].get("device", {"stall_s": 0.0})
        t.add_row(str(p["batch"]), str(p["context"]), f"{p['seconds'] * 1e3:.2f}", f"{p['tokens_per_s']:.1f}",
                  f"{dev['stall_s'] * 1e3:.2f}", str(p["timeline"]["num_ops"]))
    return t
