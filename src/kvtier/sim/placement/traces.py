"""Access traces of the placement study as compact arrays, and the accessed set of each step.

The study's unit of placement is a *unit*: ``unit_tokens`` consecutive tokens of one sequence in one
*layer group* (``num_layers / G`` consecutive layers that share one attention pattern), K and V of
every KV head. Time is cut into *simulated steps* of ``stride`` decode steps each, which share one
access pattern (the mean attention over those steps). ``AccessTrace`` holds the attention mass per
simulated step, layer group and unit; ``accessed`` turns it into the set each step reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.sim.errors import WorkloadError


@dataclass(frozen=True)
class Grid:
    """The reduced problem's resolution: workload length, unit and step sizes, layer groups."""

    prompt_tokens: int
    decode_tokens: int
    unit_tokens: int = 256
    stride: int = 10  # decode steps per simulated step
    layer_groups: int = 8

    def __post_init__(self):
        for name in ("prompt_tokens", "decode_tokens", "unit_tokens", "stride", "layer_groups"):
            if getattr(self, name) < 1:
                raise WorkloadError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def steps(self) -> np.ndarray:
        """[N] decode steps each simulated step stands for (the last one may be shorter)."""
        n, last = divmod(self.decode_tokens, self.stride)
        return np.array([self.stride] * n + ([last] if last else []), dtype=np.int64)

    @property
    def num_units(self) -> int:
        return -(-(self.prompt_tokens + self.decode_tokens) // self.unit_tokens)


@dataclass(frozen=True)
class AccessTrace:
    """Attention of one sequence (every sequence of the batch alike) at the study's resolution."""

    mass: np.ndarray  # [N, G, U] float32: share of step n's attention in layer group g on unit u
    steps: np.ndarray  # [N] int64: decode steps per simulated step
    prompt_tokens: int
    unit_tokens: int
    source: str  # where it came from, for reports

    def __post_init__(self):
        assert self.mass.ndim == 3 and self.mass.shape[0] == len(self.steps) > 0, self.mass.shape
        assert np.all(self.steps >= 1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.mass.shape  # (N, G, U)

    @property
    def context(self) -> np.ndarray:
        """[N] tokens of the sequence at the end of each simulated step."""
        return self.prompt_tokens + np.cumsum(self.steps)

    def unit_fill(self) -> np.ndarray:
        """[N, U] tokens each unit holds at the end of each simulated step."""
        starts = np.arange(self.shape[2]) * self.unit_tokens  # [U]
        return np.clip(self.context[:, None] - starts[None, :], 0, self.unit_tokens)

    def exists(self) -> np.ndarray:
        """[N, U] bool: the unit holds at least one token during the step."""
        return self.unit_fill() > 0


def accessed(trace: AccessTrace, sparsity: float) -> np.ndarray:
    """[N, G, U] bool: the units step n reads in layer group g.

    With sparsity ``s`` a step reads the ``ceil((1 - s) * n)`` units (at least one) that carry the
    most attention among the ``n`` units that exist, ties going to the more recent unit; the rest
    of the KV is not read at all (the paper reads only accessed entries).
    """
    if not 0.0 <= sparsity < 1.0:
        raise WorkloadError(f"sparsity must be within [0, 1), got {sparsity}",
                            "it is the share of the KV a step does not read, e.g. 0.9")
    exists = trace.exists()  # [N, U]
    key = np.where(exists[:, None, :], trace.mass, -np.inf)[..., ::-1]  # [N, G, U], recent units first
    order = np.argsort(-key, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(key.shape[-1])[None, None, :], axis=-1)
    rank = rank[..., ::-1]  # back to unit order
    keep = np.maximum(1, np.ceil((1.0 - sparsity) * exists.sum(axis=1) - 1e-9)).astype(np.int64)  # [N]
    return (rank < keep[:, None, None]) & exists[:, None, :]


def coverage_sparsity(trace: AccessTrace, coverage: float = 0.9) -> float:
    """The trace's own sparsity: the mean share of existing units outside the smallest set that
    carries ``coverage`` of a step's attention."""
    exists = trace.exists()
    srt = -np.sort(-np.where(exists[:, None, :], trace.mass, 0.0), axis=-1)  # [N, G, U] descending
    total = srt.sum(axis=-1, keepdims=True)
    need = (np.cumsum(srt, axis=-1) < coverage * total).sum(axis=-1) + 1  # [N, G]
    return float(np.mean(1.0 - need / exists.sum(axis=1)[:, None]))


def normalized(mass: np.ndarray, exists: np.ndarray) -> np.ndarray:
    """[N, G, U] mass zeroed on units that do not exist and scaled to sum 1 per step and group."""
    m = np.where(exists[:, None, :], np.maximum(mass, 0.0), 0.0)
    total = m.sum(axis=-1, keepdims=True)
    return (m / np.where(total > 0, total, 1.0)).astype(np.float32)
