"""Block tables: grow a sequence's table as its tokens enter the cache, release it at the end.

Logical block ids come from the ``BlockPool``; where each block lives is the ``KVManager``'s (a
policy over ``BlockPlacement``). Without a manager every free block can be used (one tier).
"""

from __future__ import annotations

from kvtier.kv.block_pool import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, kv=None):
        assert block_size > 0
        self.pool = pool
        self.block_size = block_size
        self.kv = kv  # KVManager or None

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """New blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def num_allocatable(self) -> int:
        return self.pool.num_free if self.kv is None else min(self.pool.num_free, self.kv.allocatable())

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(table, num_tokens) + reserve <= self.num_allocatable()

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks so the table holds ``num_tokens``; return the new block ids."""
        new = self.pool.allocate(self.blocks_needed(table, num_tokens))
        if new and self.kv is not None:
            self.kv.allocated(new)
        table.extend(new)
        return new

    def release(self, table: list[int]) -> None:
        freed = self.pool.free(table)
        if freed and self.kv is not None:
            self.kv.freed(freed)
        table.clear()

    # swapping whole sequences to a slower tier (policies with preemption = "swap")
    def can_swap_out(self, table: list[int]) -> bool:
        return self.kv is not None and self.kv.can_swap_out(table)

    def swap_out(self, table: list[int]) -> None:
        self.kv.swap_out(table)

    def can_swap_in(self, table: list[int], extra: int) -> bool:
        return self.kv.can_swap_in(table, extra)

    def swap_in(self, table: list[int]) -> None:
        self.kv.swap_in(table)
