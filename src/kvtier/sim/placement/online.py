"""kvtier's online policy in the study: the engine's ``DynamicPolicy`` itself, driven through the
engine's ``BlockPlacement`` (one decision logic, two executors).

Each unit is a block id ``g * U + u``; every layer group is a "sequence" whose block table lists its
units in position order, so the policy's pins (the first unit, the recent ones, the one being
written) mean what they mean in the engine. HBM is the ``device`` target with ``slots`` slots, the
off-package memory a ``host`` target that holds everything. Before each simulated step the policy
plans moves (``before_step``); after it, it observes what each unit received (``observe``).

What it observes (``signal``): with ``"reads"`` (the default), the decode steps of the simulated
step that read the unit plus its attention share as a tie-break (0 for a unit the step did not
read): what a sparse-attention engine learns from the blocks it read, and what the cost model
charges. With ``"mass"``, the attention share alone, as the dense engine passes it; ranking by mass
across layer groups fills HBM unevenly over layers, which the per-layer ``max`` of the cost model
punishes (docs/placement.md).

The engine's options are per decode step and per 16-token block of every layer; the study's step is
``k`` decode steps and its unit ``unit_tokens`` tokens of ``m`` layers, so the defaults are
translated: ``decay ** k`` per simulated step and a move budget of the same bytes per decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvtier.kv.placement import BlockPlacement, Target
from kvtier.kv.policies.dynamic import DynamicPolicy
from kvtier.sim.placement.hbm_set import first_write_order, flat, to_schedule
from kvtier.sim.placement.model import Problem

ENGINE_BLOCK_TOKENS = 16  # the engine's default block: 16 tokens of every layer


def translated_options(p: Problem, options: dict | None = None) -> dict:
    """The engine's ``DynamicPolicy`` defaults at the study's resolution, then ``options``."""
    engine = DynamicPolicy()
    k = float(np.mean(p.trace.steps))
    token_layers = engine.max_moves * ENGINE_BLOCK_TOKENS * p.workload.num_layers * k  # moved per simulated step
    budget = math.ceil(token_layers / (p.trace.unit_tokens * p.layers_per_group))
    return {"decay": engine.decay ** k, "max_moves": budget, **(options or {})}


@dataclass
class Online:
    name: ClassVar[str] = "online"
    capacity: ClassVar[bool] = True
    options: dict = field(default_factory=dict)  # DynamicPolicy options (override the translation)
    signal: str = "reads"  # what observe() gets per unit: "reads" (steps that read it + mass) or "mass"
    used: dict = field(default_factory=dict)  # the options it ran with

    def schedule(self, p: Problem) -> np.ndarray:
        self.used = translated_options(p, self.options)
        policy = DynamicPolicy(**self.used)
        f, (_, g, u) = flat(p), p.trace.shape
        pl = BlockPlacement([Target("device", f.slots, "device", "device"),
                             Target("host", f.num_units, "host", "host")], f.num_units)
        order, placed, rows = first_write_order(p), np.zeros(f.num_units, dtype=bool), []
        for n in range(len(f.exists)):
            new = order[f.exists[n][order] & ~placed[order]]
            policy.place(new.tolist(), pl)
            placed[new] = True
            units = np.flatnonzero(f.exists[n][:u])
            for block, dst in policy.before_step([(k * u + units).tolist() for k in range(g)], pl):
                pl.move(block, dst)
            rows.append(pl.target_of == 0)
            ids = np.flatnonzero(f.exists[n])
            seen = f.accessed[n] * (p.trace.steps[n] + f.mass[n]) if self.signal == "reads" else f.mass[n]
            policy.observe(ids, seen[ids].astype(np.float64))
        return to_schedule(p, rows)
