"""Sampling parameters and stop conditions on the real default model."""

from collections import Counter

import pytest
import torch

from kvtier import SamplingParams
from kvtier.engine.sampler import _candidates, draw
from kvtier.errors import RequestError

PROMPT = "Write a short story about a robot who learns to paint."


def test_draws_follow_the_distribution():
    """Inverse-CDF draws: frequencies within 4 sigma of the probabilities, never a token of zero mass (also
    where the draw rounds to the whole mass), unnormalized rows as min-p leaves them."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0], [0.1, 0.0, 0.0, 0.0, 0.3]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = [Counter() for _ in probs]
    for _ in range(n):
        for c, t in zip(counts, draw(probs, [g, g, g]).tolist(), strict=True):
            c[t] += 1
    for row, c in zip(probs, counts, strict=True):
        p = row / row.sum()
        assert set(c) == set(torch.nonzero(p).flatten().tolist())
        for t, f in c.items():
            assert abs(f / n - p[t].item()) < 4 * (p[t].item() * (1 - p[t].item()) / n) ** 0.5 + 1e-9
    top = torch.tensor([[0.25, 0.75, 0.0]])
    assert draw(top, [torch.Generator().manual_seed(1)]).item() in (0, 1)
    edge = torch.tensor([[1.0, 1.0, 0.0, 0.0]])  # a draw of exactly the whole mass takes the last token with mass
    assert torch.searchsorted(edge.cumsum(-1), edge.sum(-1, keepdim=True), right=True).item() == 4
    sure = [torch.Generator().manual_seed(s) for s in range(64)]
    assert all(t in (0, 1) for t in draw(edge.expand(64, -1).contiguous(), sure).tolist())


def _kept_by_sorting(logits, top_k, top_p):
    """Top-k then top-p on the whole sorted row, in float64: the tokens kept, as a boolean mask [N, V]."""
    vals, order = logits.double().sort(dim=-1, descending=True)
    v = logits.shape[-1]
    drop = torch.arange(v)[None, :] >= torch.where(top_k > 0, top_k, v)[:, None]
    probs = vals.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs.cumsum(-1) - probs >= top_p[:, None].double()
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, ~drop)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat rows (whole sort) to peaked ones (top 1024)
def test_top_k_top_p_candidates_match_a_whole_sort(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(9, 20000, generator=g) * scale
    top_k = torch.tensor([0, 5, 0, 3000, 0, 40, 0, 1, 0])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 0.95, 0.8, 0.99, 0.7, 1.0])  # the last row masks nothing
    vals, ids = _candidates(logits, top_k, top_p)
    kept = torch.zeros(logits.shape, dtype=torch.bool).scatter(-1, ids, vals > float("-inf"))
    assert torch.equal(kept, _kept_by_sorting(logits, top_k, top_p))


def test_same_seed_same_text_regardless_of_batch(default_llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234, ignore_eos=True)
    alone = default_llm.generate(PROMPT, p, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=24)
    batched = default_llm.generate(["Hello there", PROMPT, "1, 2, 3,"], [others, p, others], use_tqdm=False)[1]
    assert alone.token_ids == batched.token_ids
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=99, ignore_eos=True)
    different = default_llm.generate(PROMPT, other_seed, use_tqdm=False)[0]
    assert different.token_ids != alone.token_ids


def test_top_k_one_is_greedy(default_llm):
    greedy = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    top1 = default_llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, seed=3),
                                use_tqdm=False)[0]
    assert greedy.token_ids == top1.token_ids


def test_tiny_top_p_is_greedy(default_llm):
    greedy = default_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    nucleus = default_llm.generate(PROMPT, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16, seed=5),
                                   use_tqdm=False)[0]
    assert greedy.token_ids == nucleus.token_ids


def test_stop_string_cuts_the_text(default_llm):
    full = default_llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert " 5," in full.text
    out = default_llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20, stop=[" 5,"]),
                               use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == " 5,"
    assert out.text == full.text[: full.text.index(" 5,")]


def test_stop_token_ids_and_max_tokens(default_llm):
    full = default_llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert full.outputs[0].finish_reason == "length" and len(full.token_ids) == 12
    stop_id = full.token_ids[3]
    out = default_llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=12,
                                                                  stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    assert out.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_eos_ends_a_chat_reply(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and "Paris" in out.text
    assert "<|im_end|>" not in out.text


def test_n_completions_share_the_prompt(default_llm):
    out = default_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7),
                               use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
                                    dict(n=0), dict(stop=[""])])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(RequestError):
        SamplingParams(**kwargs)


def test_bad_prompts_are_refused_before_anything_runs(default_llm):
    engine = default_llm.engine
    for bad in ["", [], [10**9]]:
        with pytest.raises(RequestError):
            default_llm.generate(["fine", bad], use_tqdm=False)
    assert not engine.has_unfinished_requests()
