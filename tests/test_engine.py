"""Engine behaviour: preemption by recompute keeps outputs exact, nothing leaks, loaders work."""

import json

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.errors import ConfigError, ModelLoadError
from kvtier.models.loader import load_model, resolve_hf_folder
from tests.conftest import tiny_config

PROMPTS = [f"Item {i}: the quick brown fox jumps over the lazy dog" + "!" * i for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def test_preemption_keeps_greedy_output_identical(default_loaded):
    roomy = LLM.from_engine(LLMEngine(EngineConfig(), loaded=default_loaded))
    ref = [o.token_ids for o in roomy.generate(PROMPTS, GREEDY, use_tqdm=False)]
    tight_engine = LLMEngine(EngineConfig(num_kv_blocks=12, max_model_len=64, block_size=8), loaded=default_loaded)
    outs = LLM.from_engine(tight_engine).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert tight_engine.scheduler.num_preemptions > 0, "the pool was meant to run out"
    assert [o.token_ids for o in outs] == ref
    assert tight_engine.pool.num_free == tight_engine.pool.num_blocks


def test_abort_frees_blocks(default_loaded):
    engine = LLMEngine(EngineConfig(), loaded=default_loaded)
    rid = engine.add_request(None, "Tell me a long story.", SamplingParams(max_tokens=100))
    engine.step()
    engine.step()
    assert engine.pool.num_used > 0
    engine.abort_request(rid)
    assert engine.pool.num_used == 0 and not engine.has_unfinished_requests()


def test_streaming_text_equals_final_text(default_loaded):
    engine = LLMEngine(EngineConfig(), loaded=default_loaded)
    engine.incremental_text = True
    engine.add_request("r", "Write a sentence with an emoji and the word naïve:", SamplingParams(max_tokens=30,
                                                                                                 temperature=0))
    seen = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.text.startswith(seen)
            seen = out.text
    tok = engine.tokenizer
    assert seen == tok.decode(out.token_ids)


def test_request_stats(default_llm):
    out = default_llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), False)[0]
    s = out.stats[0]
    assert s.num_prompt_tokens == len(out.prompt_token_ids) and s.num_output_tokens == 5
    assert 0 < s.ttft_s <= s.e2e_s and s.tpot_s > 0 and s.num_preemptions == 0


def test_token_id_prompts_and_dicts(default_llm):
    ids = default_llm.get_tokenizer().encode("The capital of France is")
    a = default_llm.generate("The capital of France is", GREEDY, False)[0]
    b = default_llm.generate([ids], GREEDY, False)[0]
    c = default_llm.generate({"prompt_token_ids": ids}, GREEDY, False)[0]
    assert a.token_ids == b.token_ids == c.token_ids


def test_hf_folder_loads_and_matches_default(default_llm):
    folder = resolve_hf_folder("default")
    llm = LLM(model=str(folder))
    assert llm.generate("Hi", GREEDY, False)[0].token_ids == default_llm.generate("Hi", GREEDY, False)[0].token_ids


def test_dummy_presets_and_overrides():
    llm = LLM(model="tiny-llama", load_format="dummy", max_model_len=256)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), False)[0]
    assert len(out.token_ids) == 4
    big = load_model("llama-3-8b", "dummy", hf_overrides={"num_hidden_layers": 1, "vocab_size": 512})
    assert big.config.hidden_size == 4096 and big.config.num_kv_heads == 8 and big.config.num_layers == 1


def test_dummy_from_a_config_file(tmp_path):
    cfg = {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy"))
    assert engine.model_config.qkv_bias and engine.tokenizer is None  # 300 tokens: no borrowed tokenizer
    out = LLM.from_engine(engine).generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True), False)[0]
    assert len(out.token_ids) == 3


def test_config_errors():
    with pytest.raises(ConfigError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ConfigError, match="KV pool"):
        LLMEngine(tiny_config(num_kv_blocks=2, max_model_len=512))
    with pytest.raises(ModelLoadError, match="load-format dummy"):
        load_model("llama-3-8b")


def test_bfloat16_runs(kernel_path):
    engine = LLMEngine(tiny_config(dtype="bfloat16"))
    out = LLM.from_engine(engine).generate([[1, 2, 3, 4]], SamplingParams(max_tokens=6, ignore_eos=True), False)[0]
    assert len(out.token_ids) == 6 and engine.storages[0].k.dtype == torch.bfloat16
