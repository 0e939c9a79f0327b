"""One matrix runs every registered KV policy (kvpress-style): lossless ones must match the plain
engine token for token under a fast-tier budget so small that placement, migration or swapping
happens every few steps; every one must leave the pool empty, keep its placement consistent and
report its KV bytes per tier."""

import numpy as np
import pytest
import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.compare import agreement, compare
from kvtier.entrypoints.llm import LLM
from kvtier.errors import ConfigError
from kvtier.kv.policies import POLICY_REGISTRY, make_policy
from kvtier.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3, 4,",
    "Write a short poem about the sea.", "The three laws of motion are", "import numpy as np\n",
    "Q: What is 12 times 12?\nA:", "In 1969, the first humans",
]
MAX_TOKENS = 32
BLOCK = 8
MAX_LEN = 64  # 8 blocks per sequence; 9 prompts need about 40 blocks in all

# Per policy: the engine options of the matrix run (budgets far below the working set).
CASES = {
    "plain": dict(num_kv_blocks=64),
    "static": dict(kv_tiers="device=4blocks,host=64blocks"),
    "swap": dict(kv_tiers="device=12blocks,host=64blocks"),
    "dynamic": dict(kv_tiers="device=10blocks,host=64blocks"),
    "kcache": dict(kv_tiers="device=64blocks,host=64blocks", kv_policy_options={"top_n": 0.5}),
}
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_outputs(default_loaded):
    llm = LLM.from_engine(LLMEngine(EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN), loaded=default_loaded))
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS, False)]


_RUNS: dict[str, tuple] = {}


def run(name: str, loaded, **over) -> tuple[LLMEngine, list[list[int]]]:
    """The matrix run of ``name`` (cached: the matrix and the per-policy tests share it)."""
    if not over and name in _RUNS:
        return _RUNS[name]
    cfg = EngineConfig(kv_policy=name, block_size=BLOCK, max_model_len=MAX_LEN, **{**CASES[name], **over})
    engine = LLMEngine(cfg, log_steps=True, loaded=loaded)
    result = engine, [o.token_ids for o in LLM.from_engine(engine).generate(PROMPTS, PARAMS, False)]
    if not over:
        _RUNS[name] = result
    return result


def test_every_policy_has_a_case():
    assert set(CASES) == set(POLICY_REGISTRY)


@pytest.mark.parametrize("name", sorted(POLICY_REGISTRY))
def test_policy_matrix(name, default_loaded, plain_outputs):
    engine, outs = run(name, default_loaded)
    agree, first = agreement(outs, plain_outputs)
    if engine.policy.lossless:
        assert agree == 1.0 and first is None, f"{name} diverged from the plain engine at token {first}"
    else:
        assert agree > 0.3  # lossy, but still the same model
    engine.placement.check()
    assert engine.pool.num_free == engine.pool.num_blocks, "blocks leaked"
    usage = engine.kv_usage()
    assert set(usage) <= set(engine.policy.memory_tiers) | {"device"}
    assert all(u["blocks_used"] == 0 for u in usage.values()) and usage["device"]["peak_bytes"] > 0
    totals = engine.kv_stats.totals
    assert sum(totals.bytes_read.values()) > 0


def test_static_spills_to_host(default_loaded):
    engine, _ = run("static", default_loaded)
    t = engine.kv_stats.totals
    assert t.bytes_read["host"] > t.bytes_read["device"] > 0 and t.moves == 0


def test_swap_parks_preempted_sequences(default_loaded):
    engine, _ = run("swap", default_loaded)
    assert engine.scheduler.num_swaps > 0 and engine.kv_stats.totals.moves > 0
    assert set(engine.kv_stats.totals.bytes_read) == {"device"}  # sequences only run on the device


def test_dynamic_migrates_within_its_budget(default_loaded):
    engine, _ = run("dynamic", default_loaded)
    t = engine.kv_stats.totals
    assert t.moves > 0 and 0.0 < t.fast_mass_share <= 1.0
    moves = [r["kv"]["moves"] for r in engine.stats.step_log]
    assert max(moves) <= engine.policy.max_moves and sum(m > 0 for m in moves) >= 3


def test_kcache_reads_only_top_n_v_rows(default_loaded):
    engine, _ = run("kcache", default_loaded)
    t = engine.kv_stats.totals
    assert t.v_rows_read > 0
    assert set(engine.kv_usage()) == {"device", "host"}  # K on the device, V on the host


def _step_logits(engine: LLMEngine) -> list[torch.Tensor]:
    """Every step's logits [N, V] over PROMPTS."""
    seen, run = [], engine.runner.run

    def recording(*args, **kwargs):
        seqs, logits = run(*args, **kwargs)
        seen.append(logits.clone())
        return seqs, logits

    engine.runner.run = recording
    LLM.from_engine(engine).generate(PROMPTS, PARAMS, False)
    return seen


@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_tiers_in_one_memory_give_the_plain_logits_bit_for_bit(name, default_loaded):
    """On a CPU-only machine the device and host tiers are one memory: their targets share a storage and
    decode attention runs once over whole tables, so every logit equals the plain engine's bit for bit (two
    passes merged by log-sum-exp differ in the last bits, which int8 activations turn into other tokens)."""
    plain = LLMEngine(EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN, **CASES["plain"]), loaded=default_loaded)
    tiered = LLMEngine(EngineConfig(kv_policy=name, block_size=BLOCK, max_model_len=MAX_LEN, **CASES[name]),
                       loaded=default_loaded)
    assert len(tiered.storages) == 2 and len(tiered.cache.parts) == 1
    ref, got = _step_logits(plain), _step_logits(tiered)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert tiered.kv_stats.totals.bytes_read["host"] > 0


def test_a_disk_tier_keeps_its_own_storage(default_loaded, tmp_path):
    engine = LLMEngine(EngineConfig(kv_policy="static", block_size=BLOCK, max_model_len=MAX_LEN,
                                    kv_tiers="device=4blocks,host=8blocks,disk=64blocks", kv_disk_dir=str(tmp_path)),
                       loaded=default_loaded)
    device, host, disk = engine.storages
    assert device.whole is host.whole and (device.base, host.base) == (0, 4) and disk.whole is disk
    assert engine.cache.parts == [device.whole, disk]
    whole = device.whole.k
    assert device.k.data_ptr() == whole.data_ptr() and host.k[0, 0].data_ptr() == whole[0, 4].data_ptr()
    assert host.nbytes == 8 * engine.layout.block_bytes


@pytest.mark.parametrize("runs_share", [1.0, 0.0], ids=["runs", "rows"])
@pytest.mark.parametrize("name", ["static", "dynamic"])
def test_fetched_decode_keeps_the_plain_arithmetic(name, runs_share, default_loaded, monkeypatch):
    """A GPU engine copies off-GPU blocks to the GPU and attends over whole tables (``fetch_decode``), the next
    layer's copies ahead of its writes. Forced here on the CPU, on the reference kernels a GPU runs, with blocks
    copied as runs of consecutive slots or gathered row by row, it must give the plain engine's tokens exactly."""
    from kvtier.kernels import ext
    from kvtier.kv import fetch

    monkeypatch.setattr(ext, "load", lambda *args, **kwargs: None)
    monkeypatch.setattr(fetch, "MAX_RUNS_SHARE", runs_share)
    plain = LLMEngine(EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN), loaded=default_loaded)
    ref = [o.token_ids for o in LLM.from_engine(plain).generate(PROMPTS[:4], PARAMS, False)]
    cfg = EngineConfig(kv_policy=name, block_size=BLOCK, max_model_len=MAX_LEN, **CASES[name])
    in_place = LLMEngine(cfg, loaded=default_loaded)
    assert not in_place.cache.fetch_decode  # on the CPU every tier is attended in place
    LLM.from_engine(in_place).generate(PROMPTS[:4], PARAMS, False)
    engine = LLMEngine(cfg, loaded=default_loaded, log_steps=True)
    engine.cache.fetch_decode = True
    fetched, run_fetched = [], engine.cache._decode_fetched
    monkeypatch.setattr(engine.cache, "_decode_fetched", lambda *args: fetched.append(1) or run_fetched(*args))
    outs = [o.token_ids for o in LLM.from_engine(engine).generate(PROMPTS[:4], PARAMS, False)]
    assert outs == ref and fetched
    t = engine.kv_stats.totals
    assert t.bytes_read == in_place.kv_stats.totals.bytes_read  # the same KV read from each tier
    assert t.bytes_read["host"] > 0 and (t.moves > 0) == (name == "dynamic")


def test_fetch_runs():
    from kvtier.kv.fetch import _runs

    entries, slots = np.array([0, 1, 2, 5, 6, 9]), np.array([3, 4, 5, 0, 1, 7])
    assert _runs(entries, slots) == [(0, 3, 3), (5, 0, 2), (9, 7, 1)]
    assert _runs(np.array([4, 5]), np.array([2, 7])) == [(4, 2, 1), (5, 7, 1)]


def test_moves_read_every_source_before_writing(default_loaded):
    """A batch that demotes a block out of a slot and promotes another into it keeps both intact."""
    eng = LLMEngine(EngineConfig(kv_policy="static", block_size=BLOCK, max_model_len=32,
                                 kv_tiers="device=4blocks,host=8blocks"), loaded=default_loaded)
    blocks = eng.pool.allocate(6)
    eng.kv.allocated(blocks)  # 4 on the device, 2 on the host
    pl = eng.placement

    def cell(b):
        st = eng.storages[pl.target_of[b]]
        return st.k[:, pl.slot_of[b]], st.v[:, pl.slot_of[b]]

    for b in blocks:
        for t in cell(b):
            t.fill_(b)
    eng.pool.free([blocks[1]])
    eng.kv.freed([blocks[1]])  # one free device slot
    live = [b for b in blocks if b != blocks[1]]
    demoted = pl.slot_of[blocks[0]]
    eng.kv.apply([(blocks[4], 0), (blocks[0], 1), (blocks[5], 0)])  # promote, demote, promote into its slot
    assert pl.target_of[blocks[5]] == 0 and pl.slot_of[blocks[5]] == demoted
    for b in live:
        assert all(bool((t == b).all()) for t in cell(b)), f"block {b} lost its data"
    pl.check()


def test_unknown_policy_and_options():
    with pytest.raises(ConfigError, match="unknown KV policy"):
        make_policy("nope")
    with pytest.raises(ConfigError, match="takes no options"):
        make_policy("plain", {"x": 1})
    with pytest.raises(ConfigError, match="max_moves"):
        make_policy("dynamic", {"max_movez": 1})


def test_budget_too_small_names_the_minimum(default_loaded):
    from kvtier.errors import ConfigError

    with pytest.raises(ConfigError, match="needs 8") as e:
        LLMEngine(EngineConfig(kv_policy="swap", block_size=BLOCK, max_model_len=MAX_LEN,
                               kv_tiers="device=3blocks,host=64blocks"), loaded=default_loaded)
    assert "--kv-tiers" in str(e.value)


def test_malformed_tiers_are_refused(default_loaded):
    from kvtier.errors import ConfigError

    for bad in ("device=lots", "gpu=1GiB", "device", "device=1GiB,device=2GiB"):
        with pytest.raises(ConfigError):
            LLMEngine(EngineConfig(kv_policy="static", kv_tiers=bad), loaded=default_loaded)


def test_disk_tier_in_unwritable_dir(default_loaded, tmp_path):
    from kvtier.errors import ConfigError

    blocker = tmp_path / "a-file"  # a directory below a regular file cannot be made, even by root
    blocker.write_text("")
    with pytest.raises(ConfigError, match="disk tier"):
        LLMEngine(EngineConfig(kv_policy="static", block_size=BLOCK, max_model_len=MAX_LEN,
                               kv_tiers="device=4blocks,disk=64blocks", kv_disk_dir=str(blocker / "kv")),
                  loaded=default_loaded)


def test_disk_tier_is_lossless(default_loaded, plain_outputs, tmp_path):
    engine, outs = run("static", default_loaded, kv_tiers="device=4blocks,disk=64blocks", kv_disk_dir=str(tmp_path))
    assert outs == plain_outputs and engine.kv_stats.totals.bytes_read["disk"] > 0


def test_trace_records_mass_per_block(default_loaded, tmp_path):
    from kvtier.kv.trace import read_trace

    path = tmp_path / "t.jsonl"
    cfg = EngineConfig(kv_policy="dynamic", block_size=BLOCK, max_model_len=MAX_LEN, kv_trace=str(path),
                       **CASES["dynamic"])
    engine = LLMEngine(cfg, loaded=default_loaded)
    LLM.from_engine(engine).generate(PROMPTS[:2], PARAMS, False)
    engine.tracer.close()
    header, steps = read_trace(path)
    records = list(steps)
    assert header["num_layers"] == engine.model_config.num_layers and len(records) > MAX_TOKENS // 2
    _, seqs = records[-1]
    s = seqs[0]
    assert s.mass.shape == (header["num_layers"], header["num_kv_heads"], len(s.blocks))
    group = header["num_heads"] / header["num_kv_heads"]  # each [l, h, :] sums to Hq / H
    assert abs(s.mass.sum(-1) - group).max() < 0.02 * group


def test_compare_rows(default_llm):
    rows = compare(EngineConfig(), prompts=PROMPTS[:2], max_tokens=8)
    assert [r.policy for r in rows][0] == "plain"
    plain = rows[0]
    assert plain.agreement == 1.0 and plain.first_divergence is None and plain.decode_tokens_per_s > 0
    assert plain.kv_bytes_peak["device"] > 0
    by = {r.policy: r for r in rows}
    assert set(by) == set(POLICY_REGISTRY)
    assert all(by[n].agreement == 1.0 for n in ("static", "swap", "dynamic"))
    assert by["static"].kv_bytes_peak.get("host", 0) > 0  # compare gives tiered policies a small fast tier


def test_agreement_counts_up_to_the_first_divergence():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (0.5, 2)
    assert agreement([[1, 2], [5]], [[1, 2], [5]]) == (1.0, None)
    assert agreement([[1]], [[1, 2]]) == (0.5, 1)


# ---- a 16-bit KV cache under float32 weights (--kv-dtype) ---------------------------------------

@pytest.fixture(scope="module")
def bf16_kv_outputs(default_loaded):
    engine = LLMEngine(EngineConfig(block_size=BLOCK, max_model_len=MAX_LEN, num_kv_blocks=64, kv_dtype="bfloat16"),
                       loaded=default_loaded)
    return engine, [o.token_ids for o in LLM.from_engine(engine).generate(PROMPTS, PARAMS, False)]


def test_kv_dtype_halves_the_cache(bf16_kv_outputs, default_loaded):
    engine, _ = bf16_kv_outputs
    storage = engine.storages[0]
    assert storage.k.dtype == storage.v.dtype == torch.bfloat16
    assert engine.layout.token_bytes * 2 == engine.model_config.kv_bytes_per_token(torch.float32)
    assert default_loaded.model.dtype == torch.float32  # the weights stay float32


@pytest.mark.parametrize("name", ["static", "swap", "dynamic"])
def test_lossless_policies_at_bf16_kv(name, bf16_kv_outputs, default_loaded):
    """Placement and swapping stay exact at the cache's own dtype (prefill reads the rounded K/V too)."""
    _, outs = run(name, default_loaded, kv_dtype="bfloat16")
    assert outs == bf16_kv_outputs[1]


def test_kv_dtype_stays_close_to_float32(bf16_kv_outputs, plain_outputs):
    share, _ = agreement(bf16_kv_outputs[1], plain_outputs)
    assert share >= 0.5, f"bfloat16 KV agrees with float32 KV on only {share:.0%} of greedy tokens"


def test_kv_dtype_is_validated():
    with pytest.raises(ConfigError, match="unknown KV dtype 'int3'"):
        EngineConfig(kv_dtype="int3")


def test_bad_policy_option_values_are_config_errors():
    with pytest.raises(ConfigError, match="bad options for KV policy 'dynamic'.*decay"):
        make_policy("dynamic", {"decay": 2})
