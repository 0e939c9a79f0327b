"""The paper's bound: a look-ahead placement with perfect future knowledge, its two parameters found
by simulated annealing.

``LookAhead(W, R)``: before each step, rank units by how often the next ``W`` simulated steps read
them (in decode steps), want the top ones HBM holds, and perform the top ``R`` share of the wanted
promotions (each evicting the unwanted unit read least in the window). Simulated annealing searches
(W, R): a move changes W by +-1 or +-2, R by +-0.1, or both, with probabilities 0.4 / 0.4 / 0.2;
Metropolis acceptance ``exp(-dT / C)``; the initial temperature accepts about 80% of uphill moves;
geometric cooling by 0.9 per level; it stops when the best T improves by less than 0.1% over
``patience`` consecutive levels, at a temperature floor, or at an evaluation budget. Seeded. W moves
by one or two steps, so one run explores a narrow range of W: the search runs from a few initial
windows (1, 4, 16, 64 steps and the whole run) and keeps the best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvtier.sim.placement.hbm_set import Flat, admit, flat, to_schedule
from kvtier.sim.placement.model import Problem, evaluate


def window_reads(f: Flat, steps: np.ndarray, window: int) -> np.ndarray:
    """[N, F]: decode steps in which each unit is read over simulated steps n .. n + window - 1."""
    cum = np.vstack([np.zeros((1, f.num_units)), np.cumsum(f.accessed * steps[:, None], axis=0)])  # [N + 1, F]
    n = len(steps)
    end = np.minimum(np.arange(n) + window, n)
    return cum[end] - cum[:n]


def _top(key: np.ndarray, positive: int, k: int) -> np.ndarray:
    """Ids of the ``min(k, positive)`` largest keys (keys > 0: ``positive`` of them), largest first."""
    k = min(k, positive)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    top = np.argpartition(-key, k - 1)[:k] if k < len(key) else np.arange(len(key))
    return top[np.argsort(-key[top], kind="stable")]


def lookahead_schedule(p: Problem, window: int, share: float, f: Flat | None = None) -> np.ndarray:
    f = f or flat(p)
    reads = window_reads(f, p.trace.steps, window)
    hbm, rows = np.zeros(f.num_units, dtype=bool), []
    for n in range(len(reads)):
        score = np.where(f.exists[n], reads[n], 0.0)
        wanted = _top(score + 0.5 * f.mass[n], int(np.count_nonzero(score)), f.slots)
        keep = np.zeros_like(hbm)
        keep[wanted] = True
        idle = np.flatnonzero(hbm & ~keep)
        idle = idle[np.lexsort((f.mass[n][idle], score[idle]))]  # read least in the window first
        promos = int(np.count_nonzero(~hbm[wanted]))
        admit(hbm, wanted, idle, f.slots, limit=None if n == 0 else math.ceil(share * promos - 1e-9))
        rows.append(hbm.copy())
    return to_schedule(p, rows)


@dataclass
class Annealing:
    """The SA bound: the best ``LookAhead(W, R)`` found (``found`` holds W, R, T and evaluations)."""

    name: ClassVar[str] = "annealing"
    capacity: ClassVar[bool] = True
    seed: int = 0
    starts: tuple[int, ...] = (1, 4, 16, 64, 0)  # initial windows, one annealing run each (0: every step)
    start_share: float = 0.5
    moves_per_level: int = 10
    cooling: float = 0.9
    patience: int = 5  # levels in a row under min_gain before stopping
    min_gain: float = 1e-3
    floor: float = 1e-4  # stop below this share of the initial temperature
    budget: int = 400  # distinct (W, R) evaluations over all runs
    found: dict = field(default_factory=dict)

    def schedule(self, p: Problem) -> np.ndarray:
        cost, n, rng = _Cost(p, flat(p)), len(p.trace.steps), np.random.default_rng(self.seed)
        starts = list(dict.fromkeys(min(w or n, n) for w in self.starts))
        runs = [self._search(cost, (w0, self.start_share), n, rng, len(cost.seen) + self.budget // len(starts))
                for w0 in starts]
        w, r = min(runs, key=lambda wr: cost(*wr))
        self.found = {"W": w, "R": r, "evaluations": len(cost.seen)}
        return lookahead_schedule(p, w, r, cost.f)

    def _neighbour(self, rng, w: int, r: float, n: int) -> tuple[int, float]:
        kind = rng.choice(3, p=[0.4, 0.4, 0.2])
        if kind != 1:
            w = int(np.clip(w + rng.choice([-2, -1, 1, 2]), 1, n))
        if kind != 0:
            r = round(float(np.clip(r + rng.choice([-0.1, 0.1]), 0.0, 1.0)), 1)
        return w, r

    def _temperature(self, cost, rng, w: int, r: float, n: int) -> float:
        """C such that the mean uphill move is accepted with probability 0.8."""
        t0 = cost(w, r)
        ups = [d for d in (cost(*self._neighbour(rng, w, r, n)) - t0 for _ in range(12)) if d > 0]
        return (np.mean(ups) if ups else 1e-3 * t0) / -math.log(0.8)

    def _search(self, cost, start: tuple[int, float], n: int, rng, limit: int) -> tuple[int, float]:
        cur = best = start
        temp = temp0 = self._temperature(cost, rng, *cur, n)
        stale = 0
        while temp > self.floor * temp0 and stale < self.patience:
            before = cost(*best)
            for _ in range(self.moves_per_level):
                cand = self._neighbour(rng, *cur, n)
                delta = cost(*cand) - cost(*cur)
                if delta <= 0 or rng.random() < math.exp(-delta / temp):
                    cur = cand
                best = min(best, cur, key=lambda wr: cost(*wr))
            stale = stale + 1 if before - cost(*best) < self.min_gain * before else 0
            temp *= self.cooling
            if len(cost.seen) >= limit:
                break
        return best


class _Cost:
    """T of ``LookAhead(W, R)``, each (W, R) evaluated once."""

    def __init__(self, p: Problem, f: Flat):
        self.p, self.f, self.seen = p, f, {}

    def __call__(self, w: int, r: float) -> float:
        if (w, r) not in self.seen:
            self.seen[w, r] = evaluate(self.p, lookahead_schedule(self.p, w, r, self.f)).seconds
        return self.seen[w, r]
