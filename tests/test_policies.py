"""One matrix runs every registered KV policy (kvpress-style): lossless ones must match the plain
engine token for token, every one must leave the pool empty and report its KV bytes per tier."""

import pytest

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.compare import agreement, compare
from kvtier.entrypoints.llm import LLM
from kvtier.kv.policies import POLICY_REGISTRY, make_policy
from kvtier.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def plain_outputs(default_loaded):
    llm = LLM.from_engine(LLMEngine(EngineConfig(), loaded=default_loaded))
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32), False)]


@pytest.mark.parametrize("name", sorted(POLICY_REGISTRY))
def test_policy_matrix(name, default_loaded, plain_outputs):
    engine = LLMEngine(EngineConfig(kv_policy=name, num_kv_blocks=64, max_model_len=512), loaded=default_loaded)
    outs = LLM.from_engine(engine).generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32), False)
    agree, first = agreement([o.token_ids for o in outs], plain_outputs)
    if engine.policy.lossless:
        assert agree == 1.0 and first is None
    usage = engine.kv_usage()
    assert set(usage) == set(engine.policy.tiers())
    assert all(u["blocks_used"] == 0 and u["peak_bytes"] > 0 for u in usage.values())


def test_unknown_policy_and_options():
    from kvtier.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown KV policy"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="takes no options"):
        make_policy("plain", {"x": 1})


def test_compare_rows(default_llm):
    rows = compare(EngineConfig(), prompts=PROMPTS[:2], max_tokens=8)
    assert [r.policy for r in rows][0] == "plain"
    plain = rows[0]
    assert plain.agreement == 1.0 and plain.first_divergence is None and plain.decode_tokens_per_s > 0
    assert plain.kv_bytes_peak["device"] > 0


def test_agreement_counts_up_to_the_first_divergence():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (0.5, 2)
    assert agreement([[1, 2], [5]], [[1, 2], [5]]) == (1.0, None)
    assert agreement([[1]], [[1, 2]]) == (0.5, 1)
