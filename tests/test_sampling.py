"""Sampling parameters and stop conditions on the real default model."""

import pytest

from kvtier import SamplingParams
from kvtier.errors import RequestError

PROMPT = "Write a short story about a robot who learns to paint."


def test_same_seed_same_text_regardless_of_batch(default_llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=1234)
    alone = default_llm.generate(PROMPT, p, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=24)
    batched = default_llm.generate(["Hello there", PROMPT, "1, 2, 3,"], [others, p, others], use_tqdm=False)[1]
    assert alone.token_ids == batched.token_ids
    different = default_llm.generate(PROMPT, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=99),
                                     use_tqdm=False)[0]
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
