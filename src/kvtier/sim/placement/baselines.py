"""The paper's baselines as schedules: static (first write), reactive (promote on access, LRU) and
page-16 (Quest-like, the step's top pages with perfect knowledge of its accesses). Plus ``all-hbm``
(every unit in HBM, capacity ignored), the literal "unlimited HBM" placement.

A policy has a ``name`` and ``schedule(problem) -> [N, G, U] bool`` (the HBM set during each
simulated step); the cost model charges its reads and the migrations between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from kvtier.sim.placement.hbm_set import admit, first_write_order, flat, ranked, to_schedule
from kvtier.sim.placement.model import Problem


class Policy(Protocol):
    name: str
    capacity: bool  # False: ignores HBM's capacity (a reference, not a placement)

    def schedule(self, p: Problem) -> np.ndarray: ...


def first_write_set(p: Problem) -> np.ndarray:
    """[F] bool: the units static placement puts in HBM, the first ``slots`` ever written."""
    hbm = np.zeros(p.trace.shape[1] * p.trace.shape[2], dtype=bool)
    hbm[first_write_order(p)[: p.slots]] = True
    return hbm


@dataclass
class AllHbm:
    name: ClassVar[str] = "all-hbm"
    capacity: ClassVar[bool] = False

    def schedule(self, p: Problem) -> np.ndarray:
        return np.broadcast_to(p.trace.exists()[:, None, :], p.trace.shape).copy()


@dataclass
class Static:
    """Placed on first write, never moved: the prompt's first positions fill HBM, the rest and
    every decoded token live off-package."""

    name: ClassVar[str] = "static"
    capacity: ClassVar[bool] = True

    def schedule(self, p: Problem) -> np.ndarray:
        return to_schedule(p, [first_write_set(p)] * p.trace.shape[0])


@dataclass
class Reactive:
    """Promote on access: a unit read off-package in a step (a miss), or written, is brought into HBM
    before the next step, evicting the least recently used units that the step did not read."""

    name: ClassVar[str] = "reactive"
    capacity: ClassVar[bool] = True

    def schedule(self, p: Problem) -> np.ndarray:
        f = flat(p)
        hbm, last_use = first_write_set(p), np.full(f.num_units, -1)
        rows = []
        for n in range(len(f.accessed)):
            new = f.exists[n] & ~f.exists[max(n - 1, 0)] if n else np.zeros_like(hbm)
            if n:
                used = f.accessed[n - 1] | new
                wanted = ranked(np.flatnonzero(used), f.mass[n - 1])[: f.slots]
                idle = np.flatnonzero(hbm & ~used)
                admit(hbm, wanted, idle[np.argsort(last_use[idle], kind="stable")], f.slots)
            rows.append(hbm.copy())
            last_use[f.accessed[n]] = n
        return to_schedule(p, rows)


@dataclass
class Page16:
    """Quest-like with perfect knowledge of each step's accesses: before a step, its accessed units
    (highest attention first, as many as HBM holds) are brought in, evicting units it does not read
    (lowest attention first). No look-ahead beyond the step. The page is the study's unit."""

    name: ClassVar[str] = "page-16"
    capacity: ClassVar[bool] = True

    def schedule(self, p: Problem) -> np.ndarray:
        f = flat(p)
        hbm, rows = first_write_set(p), []
        for n in range(len(f.accessed)):
            wanted = ranked(np.flatnonzero(f.accessed[n]), f.mass[n])[: f.slots]
            keep = np.zeros_like(hbm)
            keep[wanted] = True
            idle = np.flatnonzero(hbm & ~keep)
            admit(hbm, wanted, idle[np.argsort(f.mass[n][idle], kind="stable")], f.slots)
            rows.append(hbm.copy())
        return to_schedule(p, rows)
