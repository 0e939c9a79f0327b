"""Swapping: running sequences keep their blocks in device memory; when it is full, the newest
running sequence is preempted by moving its blocks to host memory, and moved back when there is
room again (vLLM V0's swap preemption), instead of being recomputed."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.placement import BlockPlacement, Target
from kvtier.kv.policies.base import KVPolicy, register_policy


@register_policy
@dataclass
class SwapPolicy(KVPolicy):
    name = "swap"
    description = "preempted sequences move to host memory and back instead of being recomputed"
    preemption = "swap"
    memory_tiers = ("device", "host")

    def running_capacity(self, targets: list[Target]) -> int:
        return targets[0].num_slots  # running sequences live in device memory only

    def allocatable(self, pl: BlockPlacement) -> int:
        return pl.num_free(0)

    def place(self, blocks: list[int], pl: BlockPlacement) -> None:
        for b in blocks:
            pl.assign(b, 0)
