"""The plain paged KV cache: every block in device memory. The baseline every policy is held to."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kv.policies.base import KVPolicy, register_policy


@register_policy
@dataclass
class PlainPolicy(KVPolicy):
    name = "plain"
    description = "all KV blocks in device memory (vLLM-style paged cache)"
