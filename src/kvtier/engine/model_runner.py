"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.scheduler import ScheduledBatch
from kvtier.engine.sequence import Sequence
from kvtier.kernels.attention import DecodePlan
from kvtier.kv.cache import AttentionMetadata, PagedKVCache, PrefillSpan
from kvtier.models.llama import LlamaModel


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the flat batch to sample from
    sample_seqs: list[Sequence]  # the N sequences that get a new token this step


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, block_size: int):
        self.model = model
        self.kv = kv
        self.block_size = block_size
        self.device = model.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step; return the sequences to sample and their logits [N, V] (float32)."""
        if batch.new_blocks:
            self.kv.storage.zero_blocks(torch.tensor(batch.new_blocks, device=self.device))
        x = self.prepare(batch)
        hidden = self.model.forward(x.input_ids, x.positions, self.kv, x.meta)
        return x.sample_seqs, self.model.logits(hidden[x.logits_indices])

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        tables: list[list[int]] = []
        for seq in batch.decodes:
            sample_rows.append(len(ids))
            sample_seqs.append(seq)
            ids.append(seq.token_ids[seq.num_computed_tokens])
            pos.append(seq.num_computed_tokens)
            tables.append(seq.block_table)
        prefills = []
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            prefills.append(PrefillSpan(len(ids), n, start, self._tensor(seq.block_table)))
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        positions = self._tensor(pos)
        meta = AttentionMetadata(*self._slots(batch, positions), num_decode=len(batch.decodes), prefills=prefills)
        if batch.decodes:
            meta.decode_plan = self._decode_plan(tables, positions[: len(batch.decodes)] + 1)
        return StepInputs(self._tensor(ids), positions, meta, self._tensor(sample_rows), sample_seqs)

    def _slots(self, batch: ScheduledBatch, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        blocks = [s.block_table[s.num_computed_tokens // bs] for s in batch.decodes]
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            blocks.extend(seq.block_table[p // bs] for p in range(start, start + n))
        return self._tensor(blocks), positions % bs

    def _decode_plan(self, tables: list[list[int]], context_lens: torch.Tensor):
        width = max(len(t) for t in tables)
        padded = [t + [t[0]] * (width - len(t)) for t in tables]
        return DecodePlan(self._tensor(padded), context_lens)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
