"""Static placement: a block stays where it was first written, in the fastest tier with room."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.policies.base import KVPolicy, register_policy


@register_policy
@dataclass
class StaticPolicy(KVPolicy):
    name = "static"
    description = "fill the fastest tier first, then the next; blocks never move"
    memory_tiers = ("device", "host", "disk")
