"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, returns logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.scheduler import ScheduledBatch
from kvtier.engine.sequence import Sequence
from kvtier.kv.cache import AttentionMetadata, TieredKVCache
from kvtier.models.llama import LlamaModel


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the flat batch to sample from
    sample_seqs: list[Sequence]  # the N sequences that get a new token this step


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: TieredKVCache):
        self.model = model
        self.kv = kv
        self.device = model.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, observe: bool = False) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step; return the sequences to sample and their logits [N, V] (float32)."""
        if batch.new_blocks:
            self.kv.zero_new(batch.new_blocks)
        x = self.prepare(batch, observe)
        hidden = self.model.forward(x.input_ids, x.positions, self.kv, x.meta)
        return x.sample_seqs, self.model.logits(hidden[x.logits_indices])

    def prepare(self, batch: ScheduledBatch, observe: bool = False) -> StepInputs:
        ids: list[int] = []
        pos: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq in batch.decodes:
            sample_rows.append(len(ids))
            sample_seqs.append(seq)
            ids.append(seq.token_ids[seq.num_computed_tokens])
            pos.append(seq.num_computed_tokens)
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                sample_seqs.append(seq)
        meta = self.kv.prepare([(s.block_table, s.num_computed_tokens + 1) for s in batch.decodes],
                               [(s.block_table, s.num_computed_tokens, n) for s, n in batch.prefills], observe,
                               [s.slot for s in batch.decodes] + [s.slot for s, _ in batch.prefills])
        return StepInputs(self._tensor(ids), self._tensor(pos), meta, self._tensor(sample_rows), sample_seqs)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
