"""KCache (arXiv 2404.18057): K in the fast tier, V in the slow tier; decode attention scores
every key and reads only the top-N V rows per KV head. Prefill stays dense. Lossy: report its
accuracy (``kvtier eval``)."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.kernels.kcache import KCacheOptions, kcache_decode_attention
from kvtier.kv.placement import Target
from kvtier.kv.policies.base import KVPolicy, register_policy


@register_policy
@dataclass
class KCachePolicy(KVPolicy):
    name = "kcache"
    description = "K in device memory, V in host memory; decode reads only the top-N V rows"
    lossless = False
    memory_tiers = ("device", "host")
    top_n: int | float = 0.1  # V rows kept per KV head: a count, or a fraction of the context
    renormalize: bool = True  # attention over the kept rows (else p normalized over all keys)
    exempt_layers: tuple[int, ...] = (0, 1)  # layers that keep dense attention

    def __post_init__(self):
        self.exempt_layers = tuple(int(x) for x in self.exempt_layers)
        self.options = KCacheOptions(self.top_n, self.renormalize, self.exempt_layers)

    def targets(self, slots: dict[str, int], part_slots: dict[str, int]) -> list[Target]:
        n = min(part_slots.get("device", 0), part_slots.get("host", 0))
        return [Target("kcache", n, "device", "host")]

    def decode_attention(self, layer, q, k_cache, v_cache, plan, scale):
        """KCache attention for the layers it applies to; None keeps dense attention."""
        if not self.options.applies_to(layer):
            return None
        return kcache_decode_attention(q, k_cache, v_cache, plan, scale, self.top_n, self.renormalize)
