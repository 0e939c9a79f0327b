"""Continuous batching with a token budget per step, chunked prefill and preemption.

Each step: running sequences first (one token for a decode, the next chunk for a partial
prefill), oldest first; when blocks run out the newest running sequence is preempted: by
recompute (its blocks freed, its tokens recomputed later) or, under a swapping KV policy, by moving
its blocks to a slower tier. Then swapped sequences come back, then waiting sequences are admitted,
oldest first, while the token budget, the sequence limit and free blocks allow. The scheduler knows
tokens and blocks, never tensors: the simulator drives it with a cost model in place of the model
runner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvtier.engine.sequence import Sequence, Status
from kvtier.kv.block_manager import BlockManager


@dataclass(slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    watermark_blocks: int = 1  # kept free when admitting new work, so running decodes can grow

    def __post_init__(self):
        assert self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1


@dataclass(slots=True)
class ScheduledBatch:
    decodes: list[Sequence] = field(default_factory=list)  # one token each, run first
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)
    preempted: list[Sequence] = field(default_factory=list)
    new_blocks: list[int] = field(default_factory=list)  # allocated this step

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    def scheduled(self) -> list[tuple[Sequence, int]]:
        return [(s, 1) for s in self.decodes] + self.prefills


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))  # slots of running sequences
        self.num_preemptions = 0
        self.num_swaps = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status is Status.WAITING and not seq.block_table
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(batch, self.config.max_num_batched_tokens)
        if not batch.preempted:
            budget = self._swap_in(batch, budget)
            if not self.swapped:
                self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, n, batch):
                break  # seq itself was preempted: it was the newest, nothing runs after it
            self._add_to_batch(batch, seq, n)
            budget -= n
            i += 1
        return budget

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        batch.new_blocks += self.bm.grow(seq.block_table, seq.num_computed_tokens + n)
        if n == 1 and seq.num_uncomputed == 1:
            batch.decodes.append(seq)
        else:
            batch.prefills.append((seq, n))

    def _swap_in(self, batch: ScheduledBatch, budget: int) -> int:
        """Bring swapped sequences back, oldest first, while their blocks (and growth) fit."""
        cfg = self.config
        while self.swapped and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.swapped[0]
            n = min(seq.num_uncomputed, budget)
            grow = self.bm.blocks_needed(seq.block_table, seq.num_computed_tokens + n)
            reserve = cfg.watermark_blocks if self.running else 0
            if not self.bm.can_swap_in(seq.block_table, grow + reserve):
                break
            self.swapped.popleft()
            self.bm.swap_in(seq.block_table)
            self._start_running(seq)
            self._add_to_batch(batch, seq, n)
            budget -= n
        return budget

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Preempt the newest running sequences until ``seq`` can grow by ``n``; False if seq went."""
        while not self.bm.can_grow(seq.block_table, seq.num_computed_tokens + n):
            victim = self.running[-1]
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        cfg = self.config
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if n < seq.num_uncomputed and not cfg.enable_chunked_prefill:
                break
            reserve = cfg.watermark_blocks if self.running else 0
            if not self.bm.can_grow(seq.block_table, seq.num_computed_tokens + n, reserve):
                break
            self.waiting.popleft()
            batch.new_blocks += self.bm.grow(seq.block_table, seq.num_computed_tokens + n)
            self._start_running(seq)
            batch.prefills.append((seq, n))
            budget -= n

    def _start_running(self, seq: Sequence) -> None:
        assert len(self.running) < self.config.max_num_seqs and seq.slot < 0
        seq.status = Status.RUNNING
        seq.slot = self.free_slots.pop()
        self.running.append(seq)

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.slot = -1

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence off: swap its blocks to a slower tier if the KV policy swaps and
        there is room, else free them (it waits at the front and is recomputed later)."""
        self._stop_running(seq)
        seq.stats.num_preemptions += 1
        self.num_preemptions += 1
        if self.bm.can_swap_out(seq.block_table):
            self.bm.swap_out(seq.block_table)
            seq.status = Status.SWAPPED
            self.num_swaps += 1
            self.swapped.appendleft(seq)
            return
        self.bm.release(seq.block_table)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (running, waiting, swapped) and free its blocks."""
        if seq.status is Status.RUNNING:
            self._stop_running(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.status is Status.SWAPPED:
            self.swapped.remove(seq)
        self.bm.release(seq.block_table)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
