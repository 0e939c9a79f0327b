"""What the policies share: the problem as flat unit ids, ranking, and admitting units into HBM.

A flat unit id is ``g * U + u`` (layer group g, unit u). A policy keeps a boolean HBM set over flat
ids and records it before every simulated step; the result is a schedule [N, G, U] for the cost
model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.sim.placement.model import Problem


@dataclass(frozen=True)
class Flat:
    accessed: np.ndarray  # [N, F] bool
    mass: np.ndarray  # [N, F] float32
    exists: np.ndarray  # [N, F] bool
    slots: int

    @property
    def num_units(self) -> int:
        return self.accessed.shape[1]


def flat(p: Problem) -> Flat:
    n, g, u = p.trace.shape
    return Flat(p.accessed.reshape(n, g * u), p.trace.mass.reshape(n, g * u),
                np.tile(p.trace.exists(), (1, g)), p.slots)


def to_schedule(p: Problem, rows: list[np.ndarray]) -> np.ndarray:
    """N flat HBM sets -> [N, G, U] bool (units that do not exist yet dropped)."""
    x = np.stack(rows).reshape(p.trace.shape)
    return x & p.trace.exists()[:, None, :]


def first_write_order(p: Problem) -> np.ndarray:
    """Flat ids in the order a paged cache writes them: by position, every layer group of a block
    together (a block spans all layers), so the prompt's first positions come first."""
    _, g, u = p.trace.shape
    ids = np.arange(g * u)
    return ids[np.argsort((ids % u) * g + ids // u, kind="stable")]


def ranked(ids: np.ndarray, score: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """``ids`` by descending score, then descending tiebreak, then later id first."""
    keys = [-ids, -score[ids]] if tiebreak is None else [-ids, -tiebreak[ids], -score[ids]]
    return ids[np.lexsort(keys)]


def admit(hbm: np.ndarray, wanted: np.ndarray, victims: np.ndarray, slots: int, limit: int | None = None) -> int:
    """Bring ``wanted`` (flat ids, best first) into HBM in order, evicting ``victims`` (first goes
    first) when no slot is free; stop when victims run out or after ``limit`` admissions. Changes
    ``hbm`` in place; returns the number admitted."""
    miss = wanted[~hbm[wanted]]
    victims = victims[hbm[victims]]
    free = slots - int(hbm.sum())
    take = min(len(miss), max(free, 0) + len(victims), len(miss) if limit is None else limit)
    hbm[victims[: max(0, take - max(free, 0))]] = False
    hbm[miss[:take]] = True
    return take
