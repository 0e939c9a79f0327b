"""The HACK-coded KV cache in the engine (``--kv-dtype hack2/4/8``): blocks of 64 tokens hold K and V
codes, the open block's V waits 16-bit in the sequence's tail slot, decode attention runs on the codes,
prefill chunks read the cached prefix dequantized. Lossy, so it is held to accuracy bounds against the
float cache under teacher forcing; placement over it is lossless (the same format on every tier)."""

import numpy as np
import pytest
import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.eval import parse_spec, run_forced
from kvtier.entrypoints.llm import LLM
from kvtier.errors import ConfigError
from kvtier.kernels.formats import kv_bytes
from kvtier.sampling_params import SamplingParams
from kvtier.utils.texts import english_tokens
from tests.conftest import tiny_config

PROMPT_LEN, NEW = 100, 40  # 140 tokens: two full HACK blocks and an open one per sequence
BASE = dict(max_model_len=256, max_num_batched_tokens=48)  # prefill in chunks: later chunks read the prefix
PARAMS = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(default_llm):
    text = english_tokens(default_llm.get_tokenizer(), 4 * PROMPT_LEN)
    return [text[i * PROMPT_LEN:(i + 1) * PROMPT_LEN] for i in range(4)]


def generate(loaded, prompts, **over) -> tuple[LLMEngine, list[list[int]]]:
    engine = LLMEngine(EngineConfig(**{**BASE, **over}), loaded=loaded)
    outs = LLM.from_engine(engine).generate([{"prompt_token_ids": p} for p in prompts], PARAMS, False)
    return engine, [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def float_run(default_loaded, prompts):
    return generate(default_loaded, prompts)


@pytest.fixture(scope="module")
def hack4_run(default_loaded, prompts):
    return generate(default_loaded, prompts, kv_dtype="hack4")


@pytest.mark.parametrize("fmt", ["hack2", "hack4", "hack8"])
def test_hack_cache_runs_and_frees_everything(fmt, default_loaded, prompts):
    engine, outs = generate(default_loaded, prompts, kv_dtype=fmt)
    assert [len(o) for o in outs] == [NEW] * len(prompts)
    assert engine.config.block_size == 64 and engine.layout.fmt.name == fmt
    assert engine.pool.num_free == engine.pool.num_blocks, "blocks leaked"
    assert sorted(engine.scheduler.free_slots) == list(range(engine.config.max_num_seqs)), "tail slots leaked"
    cfg, storage = engine.model_config, engine.storages[0]
    per_layer = kv_bytes(fmt, cfg.num_kv_heads, cfg.head_dim)
    assert storage.nbytes == storage.target.num_slots * per_layer.block * cfg.num_layers
    assert engine.kv_tails.numel() * engine.kv_tails.element_size() == \
        engine.config.max_num_seqs * per_layer.tail_per_sequence * cfg.num_layers


@pytest.mark.parametrize(("fmt", "least"), [("hack8", 0.95), ("hack4", 0.75)])
def test_teacher_forced_accuracy_against_the_float_cache(fmt, least, default_loaded, prompts, float_run):
    """Every decode step sees the float cache's context; the share of equal top-1 picks (measured on
    this model: hack8 99%, hack4 about 89%; hack2 collapses on a 135M model and is only run)."""
    ref = float_run[1]
    plain = run_forced(LLMEngine(EngineConfig(**BASE), loaded=default_loaded), prompts, ref)
    keep = [plain.logp[r] for r in plain.order]
    fc = run_forced(LLMEngine(EngineConfig(**BASE, kv_dtype=fmt), loaded=default_loaded), prompts, ref, keep)
    share = sum(fc.top1) / len(fc.top1)
    assert share >= least, f"{fmt}: top-1 agreement {share:.1%} under teacher forcing"


def test_static_placement_over_hack_keeps_the_format_accuracy(default_loaded, prompts, hack4_run):
    """Blocks spill to the host tier as whole slabs, and attention over both tiers merges by log-sum-exp:
    exact up to float rounding (about 1e-7 in the first layer). HACK quantizes Q to 8 bits on every
    call and the next layers' K from the result, so such a difference can flip a code: placement over
    a HACK cache is as exact as HACK's own batch-to-batch jitter, not bit-exact like over a float cache.
    Measured here: top-1 98.8%, KL 0.009 against plain hack4 (hack4 against float32: 0.1)."""
    static = dict(kv_dtype="hack4", kv_policy="static", kv_tiers="device=3blocks,host=64blocks")
    engine, outs = generate(default_loaded, prompts, **static)
    assert engine.kv_stats.totals.bytes_read.get("host", 0) > 0, "nothing was placed in the host tier"
    ref = hack4_run[1]
    plain = run_forced(LLMEngine(EngineConfig(**BASE, kv_dtype="hack4"), loaded=default_loaded), prompts, ref)
    fc = run_forced(LLMEngine(EngineConfig(**BASE, **static), loaded=default_loaded), prompts, ref,
                    [plain.logp[r] for r in plain.order])
    assert sum(fc.top1) / len(fc.top1) >= 0.95 and sum(fc.kl) / len(fc.kl) < 0.03


def test_writes_keep_each_sequence_in_order_across_tiers(default_loaded, prompts):
    """A chunk whose blocks sit in two tiers is written tier by tier in token order (the open block's V
    passes through the sequence's tail): prefill over tiers gives the logits of one tier exactly."""
    def first_logits(**over):
        engine = LLMEngine(EngineConfig(**BASE, kv_dtype="hack8", **over), loaded=default_loaded)
        seen = []
        engine.logits_processor = lambda seqs, logits: seen.append(logits.clone()) or logits
        engine.add_request(None, None, SamplingParams(temperature=0, max_tokens=1), prompts[0])
        while engine.has_unfinished_requests():
            engine.step()
        return seen[-1]
    assert torch.equal(first_logits(), first_logits(kv_policy="static", kv_tiers="device=1blocks,host=64blocks"))


def test_sequences_keep_their_own_tails(default_loaded, prompts):
    """Each sequence alone sees what it saw in the batch (tail slots do not mix): teacher-forced logits
    agree up to HACK's jitter (one row through the linear layers rounds unlike a batch of four, and
    HACK requantizes what follows); hack8, whose jitter is smallest, makes a mix-up stand out."""
    engine = LLMEngine(EngineConfig(**BASE, kv_dtype="hack8"), loaded=default_loaded)
    ref = [o.token_ids for o in LLM.from_engine(engine).generate([{"prompt_token_ids": p} for p in prompts],
                                                                  PARAMS, False)]
    batch = run_forced(engine, prompts, ref)
    top1 = []
    for i in range(2):
        engine = LLMEngine(EngineConfig(**BASE, kv_dtype="hack8"), loaded=default_loaded)
        top1 += run_forced(engine, prompts[i:i + 1], ref[i:i + 1], [batch.logp[batch.order[i]]]).top1
    assert sum(top1) / len(top1) >= 0.95


def test_writes_go_in_batch_order_per_tier_run(default_loaded):
    """Rows of one step alternating between tiers are written run by run, in the batch's order."""
    engine = LLMEngine(EngineConfig(**BASE, kv_dtype="hack4"), loaded=default_loaded)
    cache = engine.cache

    class Placement:
        targets = ["device", "host"]
        target_of = np.array([1, 1, 0, 0, 1])
        slot_of = np.array([4, 5, 6, 7, 8])

    cache.placement = Placement()
    cache.parts, cache.part_of, cache.base_of = [None, None], np.array([0, 1]), np.zeros(2, dtype=np.int64)
    pos = np.arange(5)
    writes = cache._writes(pos, pos, pos)
    assert [(w.part, w.slots.tolist()) for w in writes] == [(1, [4, 5]), (0, [6, 7]), (1, [8])]


def test_preemption_recomputes_over_hack(default_loaded, prompts):
    engine, outs = generate(default_loaded, prompts, kv_dtype="hack4", num_kv_blocks=5)
    assert engine.scheduler.num_preemptions > 0
    assert [len(o) for o in outs] == [NEW] * len(prompts)
    assert engine.pool.num_free == engine.pool.num_blocks
    assert sorted(engine.scheduler.free_slots) == list(range(engine.config.max_num_seqs))


@pytest.mark.parametrize(("over", "why"), [
    (dict(kv_policy="dynamic", kv_tiers="device=4blocks,host=64blocks"), "per-block mass"),
    (dict(kv_policy="swap", kv_tiers="device=4blocks,host=64blocks"), "swapped sequence"),
    (dict(kv_policy="kcache", kv_tiers="device=64blocks,host=64blocks"), "its own attention"),
    (dict(kv_trace="trace.jsonl"), "per-block mass"),
])
def test_unsupported_combinations_are_refused(over, why, default_loaded):
    with pytest.raises(ConfigError, match=why) as e:
        LLMEngine(EngineConfig(**BASE, kv_dtype="hack4", **over), loaded=default_loaded)
    assert "--kv-policy plain or static" in e.value.fix


def test_block_size_must_be_the_partition():
    assert EngineConfig(kv_dtype="hack2").block_size == 64
    assert EngineConfig(kv_dtype="hack2", block_size=64).block_size == 64
    assert EngineConfig().block_size == 16
    with pytest.raises(ConfigError, match="blocks of 64 tokens") as e:
        EngineConfig(kv_dtype="hack4", block_size=16)
    assert "--block-size 64" in e.value.fix
    with pytest.raises(ConfigError, match="unknown KV dtype 'hack3'"):
        EngineConfig(kv_dtype="hack3")


def test_eval_spec_takes_a_kv_format():
    assert parse_spec("plain:kv_dtype=hack4") == ("plain", {"kv_dtype": "hack4"})
    with pytest.raises(ConfigError, match="unknown KV dtype"):
        parse_spec("plain:kv_dtype=hack3")


def test_tiny_model_on_the_reference_kernels(kernel_path):
    """The compiled and the pure-torch paths both serve the engine (CUDA sessions use the latter)."""
    engine = LLMEngine(tiny_config(kv_dtype="hack4", max_num_batched_tokens=32, hf_overrides={"hidden_size": 256}))
    outs = LLM.from_engine(engine).generate([{"prompt_token_ids": list(range(1, 90))}], PARAMS, False)
    assert len(outs[0].token_ids) == NEW


def test_head_dim_must_hold_whole_partitions():
    with pytest.raises(ConfigError, match="head_dim is 16") as e:
        LLMEngine(tiny_config(kv_dtype="hack4"))
    assert "float --kv-dtype" in e.value.fix


def test_compare_runs_only_the_policies_a_hack_cache_serves():
    from kvtier.entrypoints.compare import runs_on

    hack = EngineConfig(kv_dtype="hack4")
    assert [n for n in ("plain", "static", "swap", "dynamic", "kcache") if runs_on(hack, n)] == ["plain", "static"]
    assert runs_on(EngineConfig(), "dynamic")
