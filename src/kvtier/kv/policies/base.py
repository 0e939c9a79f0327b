"""The KV policy interface and its registry (kvpress-style: a small dataclass per method).

A policy decides where KV blocks live, through hooks that the engine and the simulator both call
(one decision logic, two executors), all on ``BlockPlacement`` bookkeeping, never on tensors:

- ``targets``: the storage targets it uses (slots per target, memory tier of K and of V);
- ``place``: which target each newly allocated block goes to;
- ``before_step``: which blocks to migrate before a step runs;
- ``observe``: what to learn from the attention mass each block just received;
- ``preemption``: ``"recompute"`` (free the blocks) or ``"swap"`` (park them in a slower target).

The plain paged cache answers them trivially; see ``static``, ``swap``, ``dynamic``, ``kcache``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from kvtier.errors import ConfigError
from kvtier.kv.placement import BlockPlacement, Target

POLICY_REGISTRY: dict[str, type[KVPolicy]] = {}


@dataclass
class KVPolicy:
    name: ClassVar[str]
    description: ClassVar[str]
    lossless: ClassVar[bool] = True  # greedy output must equal the plain engine's
    preemption: ClassVar[str] = "recompute"
    observes_attention: ClassVar[bool] = False  # wants per-block attention mass after each step
    memory_tiers: ClassVar[tuple[str, ...]] = ("device",)  # tiers whose budgets it uses, fastest first

    def targets(self, slots: dict[str, int], part_slots: dict[str, int]) -> list[Target]:
        """Storage targets, fastest first. ``slots[tier]``: whole blocks (K and V) the tier's budget
        holds; ``part_slots[tier]``: K-only or V-only halves it holds."""
        return [Target(t, slots[t], t, t) for t in self.memory_tiers if slots.get(t)]

    def running_capacity(self, targets: list[Target]) -> int:
        """Blocks that running sequences can hold at once (one sequence must fit: checked at start)."""
        return sum(t.num_slots for t in targets)

    def allocatable(self, pl: BlockPlacement) -> int:
        """New blocks that can be placed right now."""
        return pl.total_free()

    def place(self, blocks: list[int], pl: BlockPlacement) -> None:
        """Assign new blocks: by default to the fastest target with a free slot."""
        for b in blocks:
            pl.assign(b, next(t for t in range(len(pl.targets)) if pl.num_free(t)))

    def before_step(self, running: list[list[int]], pl: BlockPlacement) -> list[tuple[int, int]]:
        """Migrations (block, destination target) to make before the step over ``running`` tables."""
        return []

    def observe(self, blocks: np.ndarray, mass: np.ndarray) -> None:
        """Attention mass ``mass[i]`` that block ``blocks[i]`` received in the step just run (summed over
        layers, KV heads and queries)."""

    def forget(self, blocks: list[int]) -> None:
        """These blocks were freed."""


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    assert cls.name not in POLICY_REGISTRY, f"policy {cls.name} registered twice"
    POLICY_REGISTRY[cls.name] = cls
    return cls


def make_policy(name: str, options: dict | None = None) -> KVPolicy:
    cls = POLICY_REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown KV policy '{name}'", f"use one of: {', '.join(sorted(POLICY_REGISTRY))}")
    allowed = sorted(f.name for f in fields(cls) if not f.name.startswith("_"))  # _fields: internal state
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        hint = f"options of {name}: {', '.join(allowed)}" if allowed else f"{name} takes no options"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for KV policy '{name}'", hint)
    try:
        return cls(**(options or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad options for KV policy '{name}': {e}", f"options of {name}: {', '.join(allowed)}") \
            from e
