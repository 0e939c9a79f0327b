"""Tables and summary lines of the placement study."""

from __future__ import annotations

from kvtier.sim.placement.model import Problem
from kvtier.sim.placement.study import BOUNDS, PAPER_SA_OVER_STATIC
from kvtier.utils.units import format_bytes


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _info(info: dict) -> str:
    parts = []
    for k, v in info.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def results_table(rows: list[dict], title: str):
    from rich.table import Table

    t = Table(title=title)
    for c in ("policy", "ms/step", "tokens/s", "vs static", "vs unlimited", "of LP bound", "moved in",
              "moved out", "parameters"):
        t.add_column(c, justify="left" if c in ("policy", "parameters") else "right")
    for r in rows:
        name = r["policy"] + (" (bound)" if r["policy"] in BOUNDS else "")
        lp = "-" if r["of_lp"] is None else f"{100 * r['of_lp']:.1f}%"
        t.add_row(name, f"{r['ms_per_step']:.3f}", f"{r['tokens_per_s']:.0f}", _x(r["vs_static"]),
                  _x(r["vs_unlimited"]), lp, format_bytes(r["bytes_in"]), format_bytes(r["bytes_out"]),
                  _info(r["info"]))
    return t


def ceiling_over_static(p: Problem) -> float:
    """The most any placement's throughput can exceed another's (static's) under this cost model,
    new-token writes aside: ``1 + (B_hbm / B_ext) * C / (W + C)``, with ``W`` the bytes only HBM
    serves per decode step (weights, LM head, activations) and ``C`` the HBM for KV.

    Per step and layer with ``A`` accessed bytes: any placement reads at most ``min(A, C)`` from HBM,
    so it takes at most ``max((W + min(A, C)) / B_hbm, A / B_ext)``; the best takes at least
    ``min over a <= min(A, C) of max((W + a) / B_hbm, (A - a) / B_ext)`` (migrations only add). The
    ratio peaks at ``A = C + (W + C) B_ext / B_hbm`` at the value above; over layers and steps the
    ratio of sums is at most the largest ratio."""
    m = p.machine
    return 1.0 + (m.hbm_read / m.ext_read) * p.hbm_kv / (p.workload.hbm_only_bytes + p.hbm_kv)


def summary_lines(p: Problem, rows: list[dict]) -> list[str]:
    by = {r["policy"]: r for r in rows}
    lines = []
    if "annealing" in by and "static" in by:
        lines.append(f"annealing / static = {by['annealing']['vs_static']:.2f}x (paper: up to "
                     f"{PAPER_SA_OVER_STATIC}x); this model allows at most {ceiling_over_static(p):.2f}x")
    if "lp" in by:
        for name in ("annealing", "online"):
            if name in by:
                lines.append(f"{name} reaches {100 * by[name]['of_lp']:.1f}% of the LP bound's throughput")
    return lines


def sweep_table(rows: list[dict], kind: str, title: str):
    """One row per swept value: each policy's throughput over static (and the LP bound's)."""
    from rich.table import Table

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    t = Table(title=title)
    t.add_column(kind, justify="right")
    for name in policies:
        t.add_column(name, justify="right")
    for v in dict.fromkeys(r["value"] for r in rows):
        mine = {r["policy"]: r for r in rows if r["value"] == v}
        shown = f"{v / 1e9:g} GB" if kind == "capacity" else f"{v:g}"
        t.add_row(shown, *(_x(mine[n]["vs_static"]) for n in policies))
    return t
