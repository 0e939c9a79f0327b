"""From engine options to a policy's storage targets: budgets per memory tier, slots per target,
and the start-up check that one sequence of the full context fits where running sequences live.
The engine and the simulator build their KV layer with the same function."""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.errors import ConfigError
from kvtier.kv.placement import BlockPlacement, Target
from kvtier.kv.policies import KVPolicy, make_policy
from kvtier.kv.tiers import TierBudget, parse_kv_tiers
from kvtier.utils.units import format_bytes

HOST_DEFAULT_FACTOR = 4  # host budget, when a tiered policy gets none, as a multiple of the device's


@dataclass(slots=True)
class KVPlan:
    policy: KVPolicy
    targets: list[Target]
    budgets: dict[str, TierBudget]

    @property
    def num_blocks(self) -> int:
        """Logical blocks: one per slot of any target (a block holds one slot at a time)."""
        return sum(t.num_slots for t in self.targets)

    def placement(self) -> BlockPlacement:
        return BlockPlacement(self.targets, self.num_blocks)


def plan_kv(policy_name: str, policy_options: dict, kv_tiers, device_budget: TierBudget, block_bytes: int,
            part_bytes: int, need_blocks: int, block_size: int) -> KVPlan:
    """``device_budget`` is the default device budget (``--kv-cache-memory`` / ``--num-kv-blocks``);
    ``--kv-tiers`` overrides it and adds the slower tiers."""
    policy = make_policy(policy_name, policy_options)
    budgets = {"device": device_budget, **parse_kv_tiers(kv_tiers)}
    if "host" in policy.memory_tiers and "host" not in budgets:
        budgets["host"] = _scaled(budgets["device"], HOST_DEFAULT_FACTOR, "host")
    slots = {n: b.num_blocks(block_bytes) for n, b in budgets.items()}
    part_slots = {n: (b.blocks if b.blocks is not None else b.nbytes // part_bytes) for n, b in budgets.items()}
    targets = [t for t in policy.targets(slots, part_slots) if t.num_slots > 0]
    if not targets:
        raise ConfigError(f"KV policy '{policy_name}' has no memory to use",
                          f"give budgets for its tiers ({', '.join(policy.memory_tiers)}) in --kv-tiers")
    capacity = policy.running_capacity(targets)
    if capacity < need_blocks:
        raise ConfigError(
            f"the KV pool of policy '{policy_name}' holds {capacity} blocks ({capacity * block_size} tokens) for "
            f"running sequences but one sequence of the full context needs {need_blocks}",
            f"raise --kv-cache-memory (or the budgets in --kv-tiers) to at least "
            f"{format_bytes(need_blocks * block_bytes)} of device memory, or lower --max-model-len")
    return KVPlan(policy, targets, budgets)


def _scaled(b: TierBudget, factor: int, name: str) -> TierBudget:
    if b.blocks is not None:
        return TierBudget(name, blocks=b.blocks * factor)
    return TierBudget(name, nbytes=b.nbytes * factor)
