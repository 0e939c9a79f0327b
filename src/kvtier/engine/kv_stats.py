"""What the KV cache did, per memory tier: bytes read by attention, bytes migrated, blocks
resident, and (for policies that observe attention) the share of attention mass served from the
fast tier. Kept per step (``--stats``, ``log_steps``) and as run totals."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from kvtier.kv.placement import BlockPlacement, Move
from kvtier.kv.storage import KVLayout


@dataclass(slots=True)
class KVTotals:
    bytes_read: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by memory tier
    bytes_migrated_in: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_migrated_out: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    moves: int = 0
    mass_fast: float = 0.0  # attention mass on blocks in the fastest target
    mass_total: float = 0.0
    mass_oracle: float = 0.0  # mass on the blocks an oracle would have put in the fast target (top by mass)
    v_rows_read: int = 0
    peak_blocks: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # by target

    @property
    def fast_mass_share(self) -> float | None:
        return self.mass_fast / self.mass_total if self.mass_total else None

    @property
    def oracle_mass_share(self) -> float | None:
        """The bound: the share had the fast target held, at every step, the blocks with the most mass."""
        return self.mass_oracle / self.mass_total if self.mass_total else None

    def as_dict(self) -> dict:
        return {"bytes_read": dict(self.bytes_read), "bytes_migrated_in": dict(self.bytes_migrated_in),
                "bytes_migrated_out": dict(self.bytes_migrated_out), "moves": self.moves,
                "fast_mass_share": self.fast_mass_share,
                "oracle_mass_share": self.oracle_mass_share, "v_rows_read": self.v_rows_read,
                "peak_blocks": dict(self.peak_blocks)}


class KVStats:
    def __init__(self, layout: KVLayout, placement: BlockPlacement, kcache_exempt: int | None = None):
        self.layout = layout
        self.placement = placement
        self.kcache_exempt = kcache_exempt  # KCache: layers with dense V (the rest read selected rows)
        self.totals = KVTotals()

    def step(self, tokens_read: dict[int, int], v_rows_read: int, moves: list[Move], mass) -> dict:
        """Account one step; returns its record (bytes by tier, moves, resident blocks)."""
        read = self._read(tokens_read, v_rows_read)
        migrated = self._migrated(moves)
        t, pl = self.totals, self.placement
        for tier, n in read.items():
            t.bytes_read[tier] += n
        t.moves += len(moves)
        t.v_rows_read += v_rows_read
        resident = {tg.name: pl.num_used(i) for i, tg in enumerate(pl.targets)}
        for name, n in resident.items():
            t.peak_blocks[name] = max(t.peak_blocks[name], n)
        record = {"bytes_read": read, "bytes_migrated": migrated, "moves": len(moves), "resident_blocks": resident}
        if mass is not None:
            record["fast_mass_share"] = self._mass(mass)
        return record

    def _read(self, tokens_read: dict[int, int], v_rows: int) -> dict[str, int]:
        lay = self.layout
        row = lay.head_dim * lay.dtype.itemsize  # one token, one layer, one KV head, K or V
        half = lay.block_bytes // (2 * lay.block_size)  # one token, all layers and KV heads, K or V (with meta)
        read: dict[str, int] = defaultdict(int)
        for t, tokens in tokens_read.items():
            target = self.placement.targets[t]
            read[target.k_tier] += tokens * half
            if self.kcache_exempt is None:
                read[target.v_tier] += tokens * half
            else:
                read[target.v_tier] += (tokens * self.kcache_exempt * lay.num_kv_heads + v_rows) * row
        return dict(read)

    def _migrated(self, moves: list[Move]) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        part = self.layout.part_bytes
        for m in moves:
            src, dst = self.placement.targets[m.src], self.placement.targets[m.dst]
            for a, b in ((src.k_tier, dst.k_tier), (src.v_tier, dst.v_tier)):
                self.totals.bytes_migrated_out[a] += part
                self.totals.bytes_migrated_in[b] += part
                out[f"{a}->{b}"] += part
        return dict(out)

    def _mass(self, mass: np.ndarray) -> float | None:
        total = float(mass.sum())
        if total <= 0:
            return None
        fast = float(mass[self.placement.target_of[: len(mass)] == 0].sum())
        k = min(self.placement.targets[0].num_slots, len(mass))
        self.totals.mass_fast += fast
        self.totals.mass_total += total
        self.totals.mass_oracle += float(np.partition(mass, len(mass) - k)[len(mass) - k:].sum())
        return fast / total

    def usage(self, peak: bool = False) -> dict[str, dict]:
        """Blocks and bytes per memory tier (K and V of a target may sit in different tiers)."""
        out: dict[str, dict] = {}
        part = self.layout.part_bytes
        for i, tg in enumerate(self.placement.targets):
            used = self.totals.peak_blocks[tg.name] if peak else self.placement.num_used(i)
            for tier in (tg.k_tier, tg.v_tier):
                u = out.setdefault(tier, {"bytes_used": 0, "bytes_total": 0, "blocks_used": 0, "blocks_total": 0})
                u["bytes_used"] += used * part
                u["bytes_total"] += tg.num_slots * part
            for tier in tg.tiers:  # a block counts once in each tier holding part of it
                out[tier]["blocks_used"] += used
                out[tier]["blocks_total"] += tg.num_slots
        return out
