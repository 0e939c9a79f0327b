"""Dynamic placement from observed attention: hot blocks in the fast tier, cold ones below.

Each block's hotness is its attention mass, exponentially decayed over steps (``decay``). Before a
step, the blocks of the running sequences are ranked (the block being written first, then each
sequence's first ``pin_first`` blocks, where attention sinks are, and its ``pin_recent`` latest
ones: a prior that holds before anything is observed, then by hotness) and the device tier should
hold the top ones; at most ``max_moves`` blocks migrate per step, and a cold block is demoted for a
hotter one only if the newcomer is ``hysteresis`` times hotter. It uses only past attention: this
is the online policy the placement study evaluates in the simulator and the engine runs, the same
code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvtier.kv.placement import BlockPlacement
from kvtier.kv.policies.base import KVPolicy, register_policy

PINNED = 1e9  # added to the score of pinned blocks (sinks, recent)


@register_policy
@dataclass
class DynamicPolicy(KVPolicy):
    name = "dynamic"
    description = "promote blocks with decayed attention mass to the fast tier, demote cold ones"
    observes_attention = True
    memory_tiers = ("device", "host", "disk")
    decay: float = 0.9  # per step
    max_moves: int = 16  # migrations per step (a swap of two blocks counts two)
    hysteresis: float = 1.5
    pin_first: int = 1  # blocks at the start of each sequence ranked right after the one being written
    pin_recent: int = 1  # ... and blocks just before it
    _score: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def __post_init__(self):
        if not (0.0 <= self.decay < 1.0 and self.max_moves >= 0 and self.hysteresis >= 1.0
                and self.pin_first >= 0 and self.pin_recent >= 0):  # user options: make_policy reports it
            raise ValueError("decay must be in [0, 1), max_moves, pin_first and pin_recent >= 0, hysteresis >= 1")

    def _scores(self, n: int) -> np.ndarray:
        if len(self._score) < n:
            self._score = np.concatenate([self._score, np.zeros(n - len(self._score))])
        return self._score

    def place(self, blocks: list[int], pl: BlockPlacement) -> None:
        self._scores(len(pl.target_of))[blocks] = 0.0
        super().place(blocks, pl)

    def observe(self, blocks: np.ndarray, mass: np.ndarray) -> None:
        score = self._scores(int(blocks.max()) + 1 if len(blocks) else 0)
        score *= self.decay
        np.add.at(score, blocks, mass)

    def before_step(self, running: list[list[int]], pl: BlockPlacement) -> list[tuple[int, int]]:
        if len(pl.targets) < 2 or not running:
            return []
        cands = np.fromiter((b for t in running for b in t), dtype=np.int64)
        prio = self._scores(len(pl.target_of))[cands].copy()
        pinned = [b for t in running for b in t[: self.pin_first] + t[-1 - self.pin_recent:-1]]
        prio[np.isin(cands, pinned)] += PINNED
        prio[np.isin(cands, [t[-1] for t in running])] = np.inf  # the block being written
        on_device = np.asarray(pl.target_of)[cands] == 0
        order = np.lexsort((~on_device, -prio))  # ties: a block already on the device first (no idle swaps)
        ranked, prio, on_device = cands[order], prio[order], on_device[order]
        want = np.zeros(len(ranked), dtype=bool)
        want[: pl.targets[0].num_slots] = True
        promote = list(zip(ranked[want & ~on_device], prio[want & ~on_device], strict=True))  # hottest first
        demote = list(zip(ranked[~want & on_device], prio[~want & on_device], strict=True))[::-1]  # coldest first
        return self._moves(promote, demote, pl)

    def _moves(self, promote: list, demote: list, pl: BlockPlacement) -> list[tuple[int, int]]:
        """(block, priority) pairs to promote and demote -> moves within the per-step budget. Moves apply in
        order, so each goes where there is room after the ones before it (room: free slots per target)."""
        room = [pl.num_free(t) for t in range(len(pl.targets))]
        moves, budget = [], self.max_moves
        for i, (b, p) in enumerate(promote):
            if budget < (1 if room[0] else 2):
                break
            if not room[0]:
                below = next((t for t in range(1, len(room)) if room[t]), None)  # the fastest slower one
                if below is None or not demote or (p < self.hysteresis * demote[0][1] and i > 0):
                    break  # every tier full, nothing colder, or not hot enough to displace it
                moves.append((int(demote.pop(0)[0]), below))
                room[below], room[0], budget = room[below] - 1, room[0] + 1, budget - 1
            moves.append((int(b), 0))
            src = pl.target_of[b]
            room[src], room[0], budget = room[src] + 1, room[0] - 1, budget - 1
        return moves

    def forget(self, blocks: list[int]) -> None:
        self._scores(max(blocks) + 1 if blocks else 0)[blocks] = 0.0
