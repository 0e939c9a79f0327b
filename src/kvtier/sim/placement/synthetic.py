"""Synthetic attention traces with a controllable variation of token importance (seeded).

Each unit of each layer group has a log-importance ``spread * xi`` where ``xi`` is a stationary
Gaussian AR(1) process over decode steps: ``variation`` is the share of its variance redrawn every
10 decode steps (0: every unit keeps its importance for the whole run; 1: importance is reshuffled
every 10 decode steps). On top of it sit an attention sink (the first unit) and a recency bump (units
just before the token being decoded), as in real decoder attention. A step's mass is the softmax
of the log-importance over the units that exist. Sparsity is not a property of the mass: it is the
share of units a step does not read (``traces.accessed``), set separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.sim.errors import WorkloadError
from kvtier.sim.placement.traces import AccessTrace, Grid, normalized


@dataclass(frozen=True)
class SyntheticSpec:
    variation: float = 0.1  # share of a unit's log-importance variance redrawn per 10 decode steps
    spread: float = 1.5  # standard deviation of log-importance across units
    sink: float = 4.0  # extra log-importance of the first unit
    recency: float = 3.0  # extra log-importance of the unit being written, fading over ``recent_units``
    recent_units: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.variation <= 1.0:
            raise WorkloadError(f"variation must be within [0, 1], got {self.variation}",
                                "0: importance never changes, 1: reshuffled every 10 decode steps")
        if self.spread < 0 or self.recent_units <= 0:
            raise WorkloadError("spread must be >= 0 and recent_units > 0",
                                f"got spread={self.spread}, recent_units={self.recent_units}")


def _ar1(rng: np.random.Generator, steps: np.ndarray, variation: float, shape: tuple[int, int]) -> np.ndarray:
    """[N, G, U] stationary AR(1) values with unit variance."""
    xi = np.empty((len(steps), *shape))
    xi[0] = rng.standard_normal(shape)
    for n in range(1, len(steps)):
        keep = (1.0 - variation) ** (steps[n] / 10.0)  # variance kept over steps[n] decode steps
        xi[n] = np.sqrt(keep) * xi[n - 1] + np.sqrt(1.0 - keep) * rng.standard_normal(shape)
    return xi


def _position_bias(spec: SyntheticSpec, context: np.ndarray, unit_tokens: int, num_units: int) -> np.ndarray:
    """[N, U] log-importance added by position: the sink and the recency bump."""
    ends = (np.arange(num_units) + 1) * unit_tokens  # [U] one past each unit's last token
    dist = np.maximum(0, context[:, None] - np.minimum(ends[None, :], context[:, None]))  # [N, U] tokens after unit
    bias = spec.recency * np.maximum(0.0, 1.0 - dist / (spec.recent_units * unit_tokens))
    bias[:, 0] += spec.sink
    return bias


def synthetic_trace(grid: Grid, spec: SyntheticSpec) -> AccessTrace:
    rng = np.random.default_rng(spec.seed)
    steps = grid.steps
    shape = (grid.layer_groups, grid.num_units)
    xi = _ar1(rng, steps, spec.variation, shape)  # [N, G, U]
    context = grid.prompt_tokens + np.cumsum(steps)
    logit = spec.spread * xi + _position_bias(spec, context, grid.unit_tokens, grid.num_units)[:, None, :]
    trace = AccessTrace(np.zeros(xi.shape, np.float32), steps, grid.prompt_tokens, grid.unit_tokens,
                        f"synthetic variation={spec.variation:g} spread={spec.spread:g} seed={spec.seed}")
    exists = trace.exists()
    logit = np.where(exists[:, None, :], logit, -np.inf)
    mass = np.exp(logit - logit.max(axis=-1, keepdims=True))
    return AccessTrace(normalized(mass, exists), steps, grid.prompt_tokens, grid.unit_tokens, trace.source)
