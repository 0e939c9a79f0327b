"""A KV policy acting on block placement: the hooks the block manager, the scheduler and the engine
call. Moves are recorded on ``BlockPlacement`` and handed to a ``mover`` (the engine copies bytes,
the simulator charges time)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvtier.kv.placement import BlockPlacement, Move
from kvtier.kv.policies.base import KVPolicy

HOST = 1  # the target preempted sequences swap to


class KVManager:
    def __init__(self, policy: KVPolicy, placement: BlockPlacement, mover: Callable[[list[Move]], None] | None = None):
        self.policy = policy
        self.placement = placement
        self.mover = mover
        self.moves: list[Move] = []  # made since the engine last took them (swaps and before_step)

    # ---- block manager hooks --------------------------------------------------------------------
    def allocatable(self) -> int:
        return self.policy.allocatable(self.placement)

    def allocated(self, blocks: list[int]) -> None:
        self.policy.place(blocks, self.placement)

    def freed(self, blocks: list[int]) -> None:
        for b in blocks:
            self.placement.release(b)
        self.policy.forget(blocks)

    # ---- swapping -------------------------------------------------------------------------------
    def can_swap_out(self, table: list[int]) -> bool:
        pl = self.placement
        return self.policy.preemption == "swap" and len(pl.targets) > HOST and pl.num_free(HOST) >= len(table)

    def swap_out(self, table: list[int]) -> None:
        self.apply([(b, HOST) for b in table if self.placement.target_of[b] != HOST])

    def can_swap_in(self, table: list[int], extra: int) -> bool:
        return self.placement.num_free(0) >= len(table) + extra

    def swap_in(self, table: list[int]) -> None:
        self.apply([(b, 0) for b in table if self.placement.target_of[b] != 0])

    # ---- steps --------------------------------------------------------------------------------
    def before_step(self, running: list[list[int]]) -> list[Move]:
        return self.apply(self.policy.before_step(running, self.placement))

    def observe(self, blocks: np.ndarray, mass: np.ndarray) -> None:
        self.policy.observe(blocks, mass)

    def apply(self, pairs: list[tuple[int, int]]) -> list[Move]:
        moves = [self.placement.move(b, dst) for b, dst in pairs]
        if moves and self.mover is not None:
            self.mover(moves)
        self.moves += moves
        return moves

    def take_moves(self) -> list[Move]:
        moves, self.moves = self.moves, []
        return moves
