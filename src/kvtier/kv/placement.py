"""Where each KV block lives: pure bookkeeping, shared by the engine and the simulator.

A policy stores blocks in one or more *targets*, fastest first. A target has a number of slots and
keeps a block's K and V in memory tiers of its own (the same tier for ordinary placement; KCache's
single target keeps K in ``device`` and V in ``host``). A logical block id (what block tables hold)
maps to (target, slot); moving a block changes the mapping, never the tables. The engine copies the
bytes (``kv/cache.py``); the simulator charges their cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FREE = -1


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    num_slots: int
    k_tier: str  # memory tier holding the K of this target's blocks
    v_tier: str  # ... and their V

    @property
    def tiers(self) -> tuple[str, ...]:
        return (self.k_tier,) if self.k_tier == self.v_tier else (self.k_tier, self.v_tier)


@dataclass(slots=True)
class Move:
    block: int
    src: int  # target index
    dst: int
    src_slot: int
    dst_slot: int


@dataclass(slots=True)
class PlacementStats:
    moves: int = 0  # block migrations over the run
    moves_by_pair: dict = field(default_factory=dict)  # (src target, dst target) -> count


class BlockPlacement:
    def __init__(self, targets: list[Target], num_blocks: int):
        assert targets and all(t.num_slots >= 0 for t in targets)
        assert num_blocks <= sum(t.num_slots for t in targets), "more logical blocks than slots"
        self.targets = targets
        self.target_of = np.full(num_blocks, FREE, dtype=np.int64)  # arrays: step plans look them up in bulk
        self.slot_of = np.full(num_blocks, FREE, dtype=np.int64)
        self._free = [list(range(t.num_slots - 1, -1, -1)) for t in targets]  # stacks: slot 0 first
        self.stats = PlacementStats()

    def num_free(self, target: int) -> int:
        return len(self._free[target])

    def num_used(self, target: int) -> int:
        return self.targets[target].num_slots - len(self._free[target])

    def total_free(self) -> int:
        return sum(len(f) for f in self._free)

    def assign(self, block: int, target: int) -> int:
        """Give a newly allocated block a slot in ``target``; returns the slot."""
        assert self.target_of[block] == FREE, f"block {block} is placed already"
        assert self._free[target], f"target {self.targets[target].name} is full"
        slot = self._free[target].pop()
        self.target_of[block], self.slot_of[block] = target, slot
        return slot

    def release(self, block: int) -> None:
        t = self.target_of[block]
        assert t != FREE, f"block {block} is not placed"
        self._free[t].append(self.slot_of[block])
        self.target_of[block] = self.slot_of[block] = FREE

    def move(self, block: int, dst: int) -> Move:
        """Re-home a block (the caller copies its bytes); returns the move."""
        src, src_slot = self.target_of[block], self.slot_of[block]
        assert src != FREE and src != dst, f"block {block} cannot move from {src} to {dst}"
        assert self._free[dst], f"target {self.targets[dst].name} is full"
        dst_slot = self._free[dst].pop()
        self._free[src].append(src_slot)
        self.target_of[block], self.slot_of[block] = dst, dst_slot
        self.stats.moves += 1
        key = (src, dst)
        self.stats.moves_by_pair[key] = self.stats.moves_by_pair.get(key, 0) + 1
        return Move(block, src, dst, src_slot, dst_slot)

    def check(self) -> None:
        """Invariant: every slot is either free or held by exactly one placed block."""
        for t, target in enumerate(self.targets):
            held = self.slot_of[self.target_of == t].tolist()
            assert len(set(held)) == len(held), f"a slot of {target.name} is held twice"
            assert not set(held) & set(self._free[t]), f"a held slot of {target.name} is also free"
            assert len(held) + len(self._free[t]) == target.num_slots, f"slots of {target.name} leaked"
