"""The engine's KV bookkeeping, built for the simulator exactly as ``LLMEngine._build_kv`` builds it:
``kvtier.kv.setup.plan_kv`` (the policy, its storage targets in memory tiers, the budgets), the
``BlockPlacement``, a ``KVManager`` without a mover (no bytes to copy), the ``BlockPool`` and the
``BlockManager``. The moves the manager records (swaps during scheduling, the policy's migrations
before a step) are taken each step as the engine takes them and become link transfers.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from kvtier.config import EngineConfig
from kvtier.kv.block_manager import BlockManager
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.manager import KVManager
from kvtier.kv.placement import Move
from kvtier.kv.setup import plan_kv
from kvtier.kv.tiers import TierBudget
from kvtier.sim.cost_model import Transfer


class SimKV:
    def __init__(self, config: EngineConfig, device_budget: TierBudget, block_bytes: int, block_size: int,
                 need: int):
        """``device_budget``: the engine's default device budget (``--num-kv-blocks``, ``--kv-cache-memory``
        or its auto rule); ``--kv-tiers`` overrides it inside ``plan_kv``. ``need``: blocks of one sequence
        of the full context."""
        self.block_bytes, self.block_size = block_bytes, block_size
        plan = plan_kv(config.kv_policy, config.kv_policy_options, config.kv_tiers, device_budget,
                       block_bytes, block_bytes // 2, need, block_size)
        self.policy, self.targets = plan.policy, plan.targets
        self.placement = plan.placement()
        self.manager = KVManager(self.policy, self.placement)
        self.pool = BlockPool(plan.num_blocks)
        self.block_manager = BlockManager(self.pool, block_size, self.manager)

    # ---- what the cost model needs -------------------------------------------------------------
    @property
    def tiers(self) -> list[str]:
        """Memory tiers holding KV, fastest first."""
        return list(dict.fromkeys(tier for t in self.targets for tier in t.tiers))

    def before_step(self, batch) -> list[Transfer]:
        """Call the manager's hook and take its moves as ``LLMEngine.step`` does (swaps made while
        scheduling included); return them as transfers between memory tiers."""
        self.manager.before_step([s.block_table for s, _ in batch.scheduled()])
        return [tr for mv in self.manager.take_moves() for tr in self._transfers(mv)]

    def _transfers(self, mv: Move) -> list[Transfer]:
        src, dst, half = self.targets[mv.src], self.targets[mv.dst], self.block_bytes / 2
        return [Transfer(a, b, half) for a, b in ((src.k_tier, dst.k_tier), (src.v_tier, dst.v_tier)) if a != b]

    def decode_tokens_by_tier(self, decodes) -> dict[str, float] | None:
        """KV tokens the decodes read per memory tier (K and V halves apart); None: all in one tier."""
        if len(self.tiers) == 1 or not decodes:
            return None
        bs, out = self.block_size, defaultdict(float)
        target_of = self.placement.target_of
        for seq in decodes:
            ctx = seq.num_computed_tokens + 1
            for i, block in enumerate(seq.block_table[: -(-ctx // bs)]):
                t = self.targets[target_of[block]]
                n = min(bs, ctx - i * bs)
                out[t.k_tier] += n / 2
                out[t.v_tier] += n / 2
        return dict(out)

    def observe(self, decodes, heads: int) -> None:
        """Policies that learn from attention get a synthetic mass, as the simulator computes no attention:
        per decode, a third on its first block (the sink), a third on its last two, a third spread evenly;
        in total ``heads`` (one per layer and query head, as the engine sums it)."""
        if not self.policy.observes_attention or not decodes:
            return
        mass = defaultdict(float)
        for seq in decodes:
            table = seq.block_table
            for b in table:
                mass[b] += heads / 3 / len(table)
            mass[table[0]] += heads / 3
            for b in table[-2:]:
                mass[b] += heads / 3 / len(table[-2:])
        blocks = np.fromiter(mass, dtype=np.int64)
        self.manager.observe(blocks, np.fromiter(mass.values(), dtype=np.float64))

    def used_by_tier(self) -> dict[str, float]:
        """Blocks in use per memory tier now (a block split over two tiers counts half in each)."""
        out = defaultdict(float)
        for i, t in enumerate(self.targets):
            used = self.placement.num_used(i)
            out[t.k_tier] += used / 2
            out[t.v_tier] += used / 2
        return dict(out)

    def capacity_by_tier(self) -> dict[str, float]:
        """Blocks each memory tier holds for KV."""
        out = defaultdict(float)
        for t in self.targets:
            out[t.k_tier] += t.num_slots / 2
            out[t.v_tier] += t.num_slots / 2
        return dict(out)
