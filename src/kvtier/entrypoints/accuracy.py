"""Accuracy of a lossy configuration (weight formats) against float32: the model's next-token logits at
every position of a text, greedy agreement and perplexity from them.

- ``free_running_agreement``: both engines generate greedily; the share of positions with equal tokens.
  One early flip makes everything after it disagree, so it measures where continuations diverge.
- ``teacher_forced_agreement``: both models read the same text (the prompts followed by float32's greedy
  continuation) and pick their next token at each position of the continuation; the share of equal picks.
- ``perplexity``: exp(mean negative log-likelihood) of a text, the text's own next tokens as targets;
  ``decode_perplexity`` scores the same text through decode steps (what a quantized KV cache changes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvtier.entrypoints.llm import LLM
from kvtier.sampling_params import SamplingParams

ROWS = 256  # hidden rows per LM-head call when turning hidden states into logits


@torch.inference_mode()
def position_hidden(llm: LLM, ids: list[int]) -> torch.Tensor:
    """The final hidden state after each token of ``ids`` [T, H] (one prefill, possibly chunked)."""
    model = llm.engine.loaded.model
    hidden: list[torch.Tensor] = []
    forward = model.forward

    def capture(*args):
        h = forward(*args)
        hidden.append(h.clone())
        return h

    model.forward = capture  # an instance attribute over the class's method, removed below
    try:
        llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    finally:
        del model.forward
    return torch.cat(hidden)[: len(ids)]


def map_logits(llm: LLM, ids: list[int], fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``fn(logits [R, V], first_row)`` over the positions of ``ids`` in chunks of ROWS; results concatenated."""
    model = llm.engine.loaded.model
    hidden = position_hidden(llm, ids)
    with torch.inference_mode():
        return torch.cat([fn(model.logits(hidden[i: i + ROWS]), i) for i in range(0, hidden.shape[0], ROWS)])


def greedy_picks(llm: LLM, ids: list[int]) -> torch.Tensor:  # [T]: argmax after each prefix
    return map_logits(llm, ids, lambda logits, _: logits.argmax(-1))


def perplexity(llm: LLM, ids: list[int]) -> float:
    target = torch.tensor(ids[1:] + [0])

    def nll(logits: torch.Tensor, i: int) -> torch.Tensor:  # [R]
        return -torch.log_softmax(logits, -1).gather(1, target[i: i + logits.shape[0], None])[:, 0]

    return math.exp(map_logits(llm, ids, nll)[:-1].mean().item())


def decode_perplexity(llm: LLM, ids: list[int], prefix: int = 128) -> float:
    """Perplexity of ``ids[prefix:]`` read one decode step at a time after a prefill of ``ids[:prefix]``:
    every token goes through decode attention over the cache (a quantized KV format's attention runs on
    its codes), where :func:`perplexity`'s one prefill reads the chunk's own K/V in full precision."""
    from kvtier.entrypoints.eval import run_forced

    assert len(ids) > prefix, "the text must be longer than the prefix"
    fc = run_forced(llm.engine, [ids[:prefix]], [ids[prefix:]])
    return math.exp(sum(fc.nll) / len(fc.nll))


def greedy(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def free_running_agreement(ref: list[list[int]], out: list[list[int]]) -> float:
    return sum(a == b for r, o in zip(ref, out, strict=True) for a, b in zip(r, o, strict=True)) / sum(map(len, ref))


def teacher_forced_agreement(ref_llm: LLM, llm: LLM, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Share of the continuation positions where both models pick the same next token."""
    same = total = 0
    for prompt, cont in zip(prompts, continuations, strict=True):
        ids = prompt + cont[:-1]
        a, b = greedy_picks(ref_llm, ids)[len(prompt) - 1:], greedy_picks(llm, ids)[len(prompt) - 1:]
        same += int((a == b).sum())
        total += a.numel()
    return same / total
