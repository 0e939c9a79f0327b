"""KV policies: where each KV block lives and how attention reads it. One file per policy."""

from kvtier.kv.policies.base import POLICY_REGISTRY, KVPolicy, make_policy, register_policy
from kvtier.kv.policies.dynamic import DynamicPolicy
from kvtier.kv.policies.kcache import KCachePolicy
from kvtier.kv.policies.plain import PlainPolicy
from kvtier.kv.policies.static import StaticPolicy
from kvtier.kv.policies.swap import SwapPolicy

__all__ = ["POLICY_REGISTRY", "DynamicPolicy", "KCachePolicy", "KVPolicy", "PlainPolicy", "StaticPolicy",
           "SwapPolicy", "make_policy", "register_policy"]
