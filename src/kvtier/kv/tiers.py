"""Memory tiers and their budgets: ``--kv-tiers device=2GiB,host=16GiB,disk=64GiB``.

``device`` is accelerator memory (CPU memory on a CPU-only machine), ``host`` is CPU memory
(pinned when a GPU is present), ``disk`` is a memory-mapped file in a chosen directory. A budget is
a byte size (``512MiB``) or a block count (``48blocks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvtier.errors import ConfigError
from kvtier.utils.units import parse_bytes

TIER_NAMES = ("device", "host", "disk")  # fastest first


@dataclass(frozen=True, slots=True)
class TierBudget:
    name: str
    nbytes: int | None = None  # a size in bytes ...
    blocks: int | None = None  # ... or in blocks

    def num_blocks(self, block_bytes: int) -> int:
        """Whole blocks of ``block_bytes`` the budget holds."""
        return self.blocks if self.blocks is not None else self.nbytes // block_bytes


def parse_budget(name: str, text: str) -> TierBudget:
    m = re.fullmatch(r"\s*(\d+)\s*blocks?\s*", text)
    if m:
        return TierBudget(name, blocks=int(m.group(1)))
    return TierBudget(name, nbytes=parse_bytes(text, f"the {name} budget"))


def parse_kv_tiers(text: str | dict | None) -> dict[str, TierBudget]:
    """``"device=2GiB,host=16GiB"`` (or a dict of the same) -> budgets by tier name, fastest first."""
    if not text:
        return {}
    items = text.items() if isinstance(text, dict) else (p.partition("=")[::2] for p in text.split(","))
    budgets = {}
    for name, value in items:
        name = name.strip()
        if name not in TIER_NAMES:
            raise ConfigError(f"unknown memory tier '{name}' in --kv-tiers", f"use {', '.join(TIER_NAMES)}")
        if name in budgets:
            raise ConfigError(f"memory tier '{name}' appears twice in --kv-tiers", "give each tier one budget")
        if not str(value).strip():
            raise ConfigError(f"memory tier '{name}' has no budget", f"write e.g. {name}=2GiB or {name}=64blocks")
        budgets[name] = parse_budget(name, str(value))
    return {n: budgets[n] for n in TIER_NAMES if n in budgets}
