"""Replay the engine's own step log (``LLMEngine(config, log_steps=True).stats.step_log``) in the cost
model: each logged batch composition becomes a ``StepShape``."""

from __future__ import annotations

from kvtier.sim.cost_model import StepShape


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def shape_from_step_log(entry: dict, block_size: int, num_sampled: int | None = None,
                        random_rows: int = 0) -> StepShape:
    """The step as the engine logged it. The log has contexts after the step (the new token included) and
    prefill chunks as (tokens cached before, chunk length); new blocks follow from both. The log does not
    say how many rows were sampled, nor how: pass them (``len(engine.step())`` and the requests' params)."""
    ctx = list(entry["decode_context"])
    chunks = [tuple(c) for c in entry["prefill_chunks"]]
    new_blocks = sum(blocks_for(c, block_size) - blocks_for(c - 1, block_size) for c in ctx)
    new_blocks += sum(blocks_for(a + n, block_size) - blocks_for(a, block_size) for a, n in chunks)
    return StepShape(ctx, chunks, num_sampled, random_rows, new_blocks)
