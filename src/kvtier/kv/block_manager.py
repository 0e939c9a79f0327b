"""Block tables: grow a sequence's table as its tokens enter the cache, release it at the end."""

from __future__ import annotations

from kvtier.kv.block_pool import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int):
        assert block_size > 0
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """New blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(table))

    def can_grow(self, table: list[int], num_tokens: int, reserve: int = 0) -> bool:
        return self.blocks_needed(table, num_tokens) + reserve <= self.pool.num_free

    def grow(self, table: list[int], num_tokens: int) -> list[int]:
        """Append blocks so the table holds ``num_tokens``; return the new block ids."""
        new = self.pool.allocate(self.blocks_needed(table, num_tokens))
        table.extend(new)
        return new

    def release(self, table: list[int]) -> None:
        self.pool.free(table)
        table.clear()
