"""kvtier eval: rows per policy, exact for lossless policies, and clear errors for bad specs."""

import pytest

from kvtier.config import EngineConfig
from kvtier.entrypoints.eval import EvalSettings, evaluate, parse_spec, retrieval_prompt
from kvtier.errors import ConfigError
from kvtier.utils.texts import english_tokens, reference_text

SMALL = EvalSettings(max_tokens=8, ppl_tokens=400, ppl_window=200, lengths=(256,), depths=(0.5,),
                     tasks=("passkey", "kv"), prompts=("The capital of France is", "def add(a, b):"))


def test_parse_spec():
    assert parse_spec("kcache:top_n=0.1,renormalize=false") == ("kcache", {"top_n": 0.1, "renormalize": False})
    assert parse_spec("static") == ("static", {})
    with pytest.raises(ConfigError, match="unknown KV policy"):
        parse_spec("nope")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_spec("kcache:top_n")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_spec("kcache:topn=3")


def test_reference_text_is_long_english(default_llm):
    assert len(reference_text()) > 100_000
    ids = english_tokens(default_llm.get_tokenizer(), 8192)
    assert len(ids) == 8192


def test_retrieval_prompt_has_the_fact_at_the_depth(default_llm):
    import random

    tok = default_llm.get_tokenizer()
    for task in ("passkey", "kv"):
        ids, key = retrieval_prompt(tok, task, 512, 0.5, random.Random(1))
        assert abs(len(ids) - 512) <= 8 and key in tok.decode(ids)
        at = tok.decode(ids).index(key) / len(tok.decode(ids))
        assert 0.3 < at < 0.7
    with pytest.raises(ConfigError, match="too short"):
        retrieval_prompt(tok, "passkey", 10, 0.5, random.Random(1))


def test_evaluate_rows(default_llm):
    rows = evaluate(EngineConfig(max_model_len=512, num_kv_blocks=256),
                    [("static", {}), ("kcache", {"top_n": 1.0}), ("kcache", {"top_n": 2})], SMALL)
    plain, static, dense, tiny = rows
    assert plain.label == "plain" and plain.perplexity > 1 and set(plain.retrieval) == {"passkey@256", "kv@256"}
    assert static.agreement == 1.0 and static.perplexity == pytest.approx(plain.perplexity)
    assert static.kl_max == 0.0  # the plain engine's logits bit for bit, and the reference kept in float32
    assert dense.forced_agreement == 1.0 and dense.kl_mean < 1e-4  # every V row kept: exact up to rounding
    assert tiny.kl_mean > dense.kl_mean and tiny.label == "kcache:top_n=2" and not tiny.lossless
    assert all(r.seconds > 0 for r in rows)


def test_agreement_prompts_of_english_text(default_llm):
    from dataclasses import replace

    from kvtier.entrypoints.eval import _agreement_prompts

    engine = default_llm.engine
    long = replace(SMALL, context_tokens=300)
    prompts = _agreement_prompts(engine, long)
    assert [len(p) for p in prompts] == [300, 300]
    assert prompts[0] + prompts[1] == english_tokens(engine.tokenizer, 600)  # consecutive windows
    with pytest.raises(ConfigError, match="exceed the model's"):
        _agreement_prompts(engine, replace(SMALL, context_tokens=engine.max_model_len))
