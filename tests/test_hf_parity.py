"""Greedy output must be token-identical to HF transformers' generate() on the same float32 weights."""

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.models.loader import resolve_hf_folder

PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):",
    "Here is a recipe for pancakes:\n",
    "In 1969, Neil Armstrong",
    "The three laws of thermodynamics state that",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your company. "
    "I have five years of experience building distributed systems, and",
    "Memory bandwidth limits the speed of large language model inference because every generated token "
    "requires reading all of the model weights from memory. The key-value cache adds to this traffic, "
    "and it grows with the length of the context. Several techniques reduce this cost: quantization "
    "stores the cache in fewer bits, offloading moves part of it to a slower but larger memory, and "
    "sparse attention reads only the most important entries. In this article we compare",
    "Q: What is 17 times 23?\nA:",
]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def hf_reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_hf_folder("default")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            out.append(gen[0, ids.shape[1]:].tolist())
    assert len({len(tok(p).input_ids) for p in PROMPTS}) >= 6, "prompts of varied length"
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


def test_one_at_a_time(default_llm, hf_reference, kernel_path):
    for prompt, ref in zip(PROMPTS, hf_reference, strict=True):
        out = default_llm.generate(prompt, GREEDY, use_tqdm=False)[0]
        assert out.token_ids == ref, f"diverged on {prompt[:40]!r}"


def test_batched_mixed_lengths(default_llm, hf_reference, kernel_path):
    outs = default_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, outs, hf_reference, strict=True):
        assert out.token_ids == ref, f"diverged on {prompt[:40]!r}"


def test_batched_with_chunked_prefill_and_small_blocks(default_loaded, hf_reference):
    from kvtier.config import EngineConfig
    from kvtier.engine.llm_engine import LLMEngine

    # same weights, a different cache geometry and token budget: prompts arrive in chunks
    llm = LLM.from_engine(LLMEngine(EngineConfig(block_size=8, max_num_batched_tokens=48, max_num_seqs=5),
                                    loaded=default_loaded))
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_reference
