"""KV policies: where each KV block lives and how attention reads it. One file per policy."""

from kvtier.kv.policies.base import POLICY_REGISTRY, KVPolicy, make_policy, register_policy
from kvtier.kv.policies.plain import PlainPolicy

__all__ = ["POLICY_REGISTRY", "KVPolicy", "PlainPolicy", "make_policy", "register_policy"]
