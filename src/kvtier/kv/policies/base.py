"""The KV policy interface and its registry (kvpress-style: a small dataclass per method).

A policy answers three questions, each a hook the engine and the simulator call:
- ``place(block_ids)``: which memory tier new blocks go to;
- ``before_step(batch)``: which blocks to migrate before the step runs;
- ``observe(layer, ...)``: what to learn from the attention just computed.
The plain paged cache answers them trivially; tiered, KCache and quantized policies build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

from kvtier.errors import ConfigError

POLICY_REGISTRY: dict[str, type[KVPolicy]] = {}


@dataclass
class KVPolicy:
    name: ClassVar[str]
    description: ClassVar[str]
    lossless: ClassVar[bool] = True  # greedy output must equal the plain engine's

    def tiers(self) -> list[str]:
        """Memory tiers this policy uses, fastest first."""
        return ["device"]

    def place(self, block_ids: list[int]) -> None:
        """New blocks were allocated; choose their tier."""

    def before_step(self, batch) -> None:
        """Plan migrations for the coming step."""

    def observe(self, layer: int, attention) -> None:
        """Learn from the attention of the step just run."""


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    assert cls.name not in POLICY_REGISTRY, f"policy {cls.name} registered twice"
    POLICY_REGISTRY[cls.name] = cls
    return cls


def make_policy(name: str, options: dict | None = None) -> KVPolicy:
    cls = POLICY_REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown KV policy '{name}'", f"use one of: {', '.join(sorted(POLICY_REGISTRY))}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(options or {}) - allowed)
    if unknown:
        hint = f"options of {name}: {', '.join(sorted(allowed))}" if allowed else f"{name} takes no options"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for KV policy '{name}'", hint)
    return cls(**(options or {}))
