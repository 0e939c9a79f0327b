"""Run placement policies and bounds on one problem, normalize, and sweep a parameter.

Every policy and bound of a run sees the same ``Problem`` (trace, accessed sets, resolution, HBM
slots, cost coefficients), so their ratios compare like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvtier.sim.placement import bounds
from kvtier.sim.placement.annealing import Annealing
from kvtier.sim.placement.baselines import AllHbm, Page16, Reactive, Static
from kvtier.sim.placement.model import Problem, Result, evaluate
from kvtier.sim.placement.online import Online
from kvtier.utils.choices import comma_choices

PAPER_SA_OVER_STATIC = 5.87  # arXiv 2508.13231: the SA bound reaches up to 5.87x static throughput
POLICY_NAMES = ("unlimited", "static", "reactive", "page-16", "annealing", "online", "lp", "all-hbm")
DEFAULT_POLICIES = POLICY_NAMES[:-1]
BOUNDS = ("unlimited", "lp")  # not placements: a ceiling and a lower bound on T


@dataclass(frozen=True)
class Settings:
    seed: int = 0  # simulated annealing's
    online_options: dict = field(default_factory=dict)
    online_signal: str = "reads"
    lp_window: int | None = 5


def policy_names(text: str) -> list[str]:
    return comma_choices(text, POLICY_NAMES, "placement policy")


def _solve(name: str, p: Problem, s: Settings) -> tuple[Result, dict]:
    if name == "unlimited":
        return bounds.unlimited(p), {}
    if name == "lp":
        return bounds.lp_bound(p, s.lp_window), {"window": s.lp_window}
    policy = {"static": Static(), "reactive": Reactive(), "page-16": Page16(), "all-hbm": AllHbm(),
              "annealing": Annealing(seed=s.seed), "online": Online(s.online_options, s.online_signal)}[name]
    result = evaluate(p, policy.schedule(p), policy.capacity)
    return result, dict(getattr(policy, "found", {}) or getattr(policy, "used", {}))


def run(p: Problem, names: list[str], s: Settings, advance: Callable[[], None] | None = None) -> list[dict]:
    """One row per policy: T, throughput, migrated bytes, its parameters, solve time; normalized."""
    rows = []
    for name in names:
        start = time.perf_counter()
        r, info = _solve(name, p, s)
        rows.append({"policy": name, "seconds": r.seconds, "tokens_per_s": r.tokens_per_s,
                     "ms_per_step": 1e3 * r.seconds / p.trace.steps.sum(), "bytes_in": r.bytes_in,
                     "bytes_out": r.bytes_out, "info": info, "solve_s": time.perf_counter() - start})
        if advance:
            advance()
    return normalize(rows)


def normalize(rows: list[dict]) -> list[dict]:
    """Adds throughput relative to static, to unlimited HBM and to the LP bound (where present)."""
    by = {r["policy"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        for key, ref in (("vs_static", "static"), ("vs_unlimited", "unlimited"), ("of_lp", "lp")):
            r[key] = r["tokens_per_s"] / by[ref] if ref in by else None
    return rows


def sweep(p: Problem, kind: str, values: list[float], names: list[str], s: Settings,
          trace_for: Callable[[float], object] | None = None, advance=None) -> list[dict]:
    """Rows of ``run`` at each value of ``kind``: sparsity, variation (needs ``trace_for``, a synthetic
    trace per value) or capacity (bytes of HBM for KV)."""
    out = []
    for v in values:
        if kind == "sparsity":
            q = replace(p, sparsity=v)
        elif kind == "capacity":
            q = replace(p, hbm_kv=v)
        else:
            q = replace(p, trace=trace_for(v))
        out += [dict(r, swept=kind, value=v) for r in run(q, names, s, advance)]
    return out
