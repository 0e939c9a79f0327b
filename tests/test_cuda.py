"""The engine on a CUDA GPU (skipped without one): the guarantees the CPU suite checks, on the device.

- float32 greedy output equals HF transformers' generate() run on the same GPU;
- every lossless KV policy equals the plain engine token for token with the host tier in pinned CPU
  memory, and the lossy ones (KCache, HACK) still run and report their agreement;
- a pool too small for the batch preempts and still finishes every request.

Host-tier blocks are fetched to the GPU for decode attention (``TieredKVCache.fetch_decode``), so the
tiered policies run the plain cache's arithmetic there and stay exact in bfloat16 too.
"""

import pytest
import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.compare import agreement
from kvtier.entrypoints.llm import LLM
from kvtier.errors import ConfigError
from kvtier.sampling_params import SamplingParams
from tests.test_policies import BLOCK, CASES, MAX_LEN

pytestmark = pytest.mark.gpu

PROMPTS = [
    "The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
    "Q: What is 12 times 12?\nA:", "In 1969, the first humans",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def cuda_loaded():
    """The default model on the GPU in bfloat16 (the engine's CUDA default)."""
    return LLM(model="default", device="cuda", num_kv_blocks=64, max_model_len=MAX_LEN).engine.loaded


def _generate(loaded, **cfg) -> tuple[LLMEngine, list[list[int]]]:
    engine = LLMEngine(EngineConfig(device="cuda", block_size=BLOCK, max_model_len=MAX_LEN, **cfg), loaded=loaded)
    outs = LLM.from_engine(engine).generate(PROMPTS, GREEDY, use_tqdm=False)
    return engine, [o.token_ids for o in outs]


def test_float32_matches_hf_on_the_gpu():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtier.models.loader import resolve_hf_folder

    folder = resolve_hf_folder("default")
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).cuda().eval()
    llm = LLM(model="default", device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ids = tok(prompt, return_tensors="pt").input_ids.cuda()
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
            assert out.token_ids == ref, f"diverged from HF on the GPU for {prompt!r}"


LOSSLESS = ("static", "swap", "dynamic")  # with the CPU matrix's budgets (tests/test_policies.py)


@pytest.fixture(scope="module")
def plain_on_gpu(cuda_loaded):
    return _generate(cuda_loaded, **CASES["plain"])[1]


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_lossless_policies_on_the_gpu(name, cuda_loaded, plain_on_gpu):
    engine, outs = _generate(cuda_loaded, kv_policy=name, **CASES[name])
    agree, first = agreement(outs, plain_on_gpu)
    assert agree == 1.0 and first is None, f"{name} diverged from the plain engine at token {first}"
    assert engine.pool.num_free == engine.pool.num_blocks
    host = [s for s in engine.storages if s.target.k_tier == "host"]
    assert host and all(s.layer(0)[0].is_pinned() for s in host), "host KV lives in pinned memory"
    assert sum(engine.kv_stats.totals.bytes_read.values()) > 0


@pytest.mark.parametrize("cfg", [
    dict(kv_policy="kcache", kv_tiers="device=64blocks,host=64blocks", kv_policy_options={"top_n": 0.5}, block_size=8),
    dict(kv_dtype="hack8", num_kv_blocks=32),
], ids=["kcache", "hack8"])
def test_lossy_policies_run_on_the_gpu(cfg, cuda_loaded, plain_on_gpu):
    engine = LLMEngine(EngineConfig(device="cuda", max_model_len=128, **cfg), loaded=cuda_loaded)
    outs = [o.token_ids for o in LLM.from_engine(engine).generate(PROMPTS, GREEDY, use_tqdm=False)]
    agree, _ = agreement(outs, plain_on_gpu)
    assert agree > 0.3 and engine.pool.num_free == engine.pool.num_blocks


def test_preemption_on_the_gpu(cuda_loaded, plain_on_gpu):
    """Recompute after preemption finishes every request. It is exact on the CPU (test_engine); on a GPU the
    recomputed K/V come from GEMMs of another row count than the decode steps that first wrote them, and
    cuBLAS is not batch-invariant in bfloat16, so only near-identity is promised (swap is exact: above)."""
    engine, outs = _generate(cuda_loaded, num_kv_blocks=12)
    assert engine.scheduler.num_preemptions > 0
    assert [len(o) for o in outs] == [GREEDY.max_tokens] * len(PROMPTS)
    assert engine.pool.num_free == engine.pool.num_blocks
    assert agreement(outs, plain_on_gpu)[0] >= 0.9


def test_hack_refuses_host_blocks_on_the_gpu(cuda_loaded):
    """HACK attention reads codes on the engine's device only: a host tier is refused at start-up."""
    with pytest.raises(ConfigError, match="must sit on the engine's device"):
        LLMEngine(EngineConfig(device="cuda", kv_dtype="hack4", kv_policy="static", max_model_len=128,
                               kv_tiers="device=3blocks,host=32blocks"), loaded=cuda_loaded)
