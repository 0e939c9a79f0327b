"""The serving simulation drives the engine's own scheduler: same decisions as the engine, on a clock."""

import json
import math

import pytest

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.scheduler import Scheduler
from kvtier.entrypoints.cli import main
from kvtier.errors import ConfigError
from kvtier.sampling_params import SamplingParams
from kvtier.sim.errors import CapacityError, WorkloadError
from kvtier.sim.hardware import load_system
from kvtier.sim.serving import ServingSimulator
from kvtier.sim.workload import RequestSpec, load_trace, poisson, save_trace
from tests.conftest import tiny_config

H100 = load_system("h100-sxm", "ddr5-genoa")


def _composition(log):
    return [(e["num_decode"], e["decode_context"], [tuple(c) for c in e["prefill_chunks"]], e["preempted"])
            for e in log]


def run_engine(cfg, specs) -> LLMEngine:
    """The real engine on the same requests the simulator gets (all arrive at once)."""
    engine = LLMEngine(cfg, log_steps=True)
    for s in specs:
        engine.add_request(s.request_id, None, SamplingParams(max_tokens=s.output_len, ignore_eos=True),
                           [7] * s.prompt_len)
    while engine.has_unfinished_requests():
        engine.step()
    return engine


@pytest.mark.parametrize("blocks, budget", [(400, 64), (8, 32)])  # roomy; a pool that forces preemption
def test_same_step_decisions_as_the_engine(blocks, budget):
    cfg = tiny_config(num_kv_blocks=blocks, block_size=8, max_num_seqs=4, max_num_batched_tokens=budget,
                      max_model_len=64)
    specs = [RequestSpec(str(i), 0.0, 5 + 3 * i, 10 + 4 * i) for i in range(6)]
    engine = run_engine(cfg, specs)
    sim = ServingSimulator(cfg, H100, log_steps=True)
    assert isinstance(sim.scheduler, Scheduler)
    result = sim.run(specs)
    assert _composition(result.step_log) == _composition(engine.stats.step_log)
    assert (sim.scheduler.num_preemptions > 0) == (blocks == 8) == (engine.scheduler.num_preemptions > 0)
    assert sorted(len(r.token_times) for r in result.records) == sorted(s.output_len for s in specs)
    assert sim.pool.num_free == blocks


def test_poisson_run_reports_latencies_throughput_memory():
    cfg = EngineConfig(model="llama-3-8b", max_num_seqs=32, max_num_batched_tokens=512)
    reqs = poisson(8.0, 40, "64-512", "16-64", seed=3)
    res = ServingSimulator(cfg, H100).run(reqs)
    s = res.summary()
    assert s["num_finished"] == 40 and s["output_throughput"] > 0 and s["request_throughput"] > 0
    for r, spec in zip(sorted(res.records, key=lambda r: int(r.request_id)), reqs, strict=True):
        assert len(r.token_times) == spec.output_len and r.token_times == sorted(r.token_times)
        assert 0 < r.ttft <= r.e2e and r.arrival == spec.arrival_time
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        st = s[key]
        assert 0 < st["p50"] <= st["p90"] <= st["p99"] and st["mean"] > 0
    mem = s["memory"]["device"]
    assert 0 < mem["kv_mean"] <= mem["kv_peak"] <= mem["kv_pool"] and mem["weights"] > 15e9
    assert 0 < s["utilization"]["device"] <= 1


def test_higher_load_is_never_cheaper_per_request():
    cfg = EngineConfig(model="llama-3-8b", max_num_seqs=64)
    slow = ServingSimulator(cfg, H100).run(poisson(1.0, 30, "256", "64", seed=1)).summary()
    fast = ServingSimulator(cfg, H100).run(poisson(math.inf, 30, "256", "64", seed=1)).summary()
    assert fast["ttft_s"]["mean"] > slow["ttft_s"]["mean"] and fast["tpot_s"]["mean"] > slow["tpot_s"]["mean"]
    assert fast["output_throughput"] > slow["output_throughput"]


def test_weights_or_pool_that_do_not_fit_are_errors():
    with pytest.raises(CapacityError, match="do not fit"):
        ServingSimulator(EngineConfig(model="llama-3-70b"), H100)
    with pytest.raises(CapacityError, match="num-kv-blocks"):
        ServingSimulator(EngineConfig(model="llama-3-8b", num_kv_blocks=10**6), H100)


def test_weight_formats_the_cost_model_lacks_are_refused():
    with pytest.raises(ConfigError, match="weight format 'int8'"):
        ServingSimulator(EngineConfig(model="llama-3-8b", weights="int8"), H100)


def test_prompt_longer_than_the_context_is_a_workload_error():
    sim = ServingSimulator(EngineConfig(model="llama-3-8b", max_model_len=128), H100)
    with pytest.raises(WorkloadError, match="max_model_len is 128"):
        sim.run([RequestSpec("long", 0.0, 200, 4)])


def test_static_placement_puts_kv_on_the_host_and_costs_the_link():
    base = dict(model="llama-3-8b", max_num_seqs=16, max_model_len=2048)
    reqs = poisson(math.inf, 16, "1024", "32", seed=0)
    plain = ServingSimulator(EngineConfig(**base), H100).run(reqs).summary()
    tiered = ServingSimulator(EngineConfig(**base, kv_policy="static", kv_tiers="device=256blocks,host=4096blocks"),
                              H100).run(reqs).summary()
    assert tiered["memory"]["host"]["kv_peak"] > 0 and tiered["memory"]["device"]["kv_pool"] == 256 * 16 * 131072
    assert tiered["tpot_s"]["mean"] > 2 * plain["tpot_s"]["mean"]  # most KV crosses PCIe every step
    assert tiered["utilization"]["pcie:host>device"] > 0.5


def test_swap_preemption_moves_blocks_both_ways():
    cfg = EngineConfig(model="llama-3-8b", max_num_seqs=16, max_model_len=2048, kv_policy="swap",
                       kv_tiers="device=160blocks,host=2048blocks")
    res = ServingSimulator(cfg, H100).run(poisson(math.inf, 16, "512-1024", "64", seed=2)).summary()
    assert res["num_preemptions"] > 0 and res["num_finished"] == 16
    assert res["link_bytes"]["device>host"] > 0 and res["link_bytes"]["host>device"] > 0


def test_host_tier_without_a_host_is_a_clear_error():
    from kvtier.sim.errors import HardwareError

    cfg = EngineConfig(model="llama-3-8b", kv_policy="static", kv_tiers="device=256blocks,host=1024blocks")
    with pytest.raises(HardwareError, match="--host"):
        ServingSimulator(cfg, load_system("h100-sxm"))


def test_same_step_decisions_as_the_engine_under_swapping():
    cfg = tiny_config(kv_policy="swap", kv_tiers="device=8blocks,host=64blocks", block_size=8, max_num_seqs=4,
                      max_num_batched_tokens=32, max_model_len=64)
    specs = [RequestSpec(str(i), 0.0, 5 + 3 * i, 10 + 4 * i) for i in range(6)]
    engine = run_engine(cfg, specs)
    sim = ServingSimulator(cfg, H100, log_steps=True)
    result = sim.run(specs)
    assert _composition(result.step_log) == _composition(engine.stats.step_log)
    assert sim.scheduler.num_swaps == engine.scheduler.num_swaps > 0


def test_poisson_is_reproducible_and_keeps_lengths_across_rates():
    a, b = poisson(2.0, 20, "10-100", "5", seed=7), poisson(2.0, 20, "10-100", "5", seed=7)
    c = poisson(math.inf, 20, "10-100", "5", seed=7)
    assert a == b and a[0].arrival_time == 0.0 and all(r.arrival_time == 0 for r in c)
    assert [r.prompt_len for r in a] == [r.prompt_len for r in c] and all(10 <= r.prompt_len <= 100 for r in a)
    with pytest.raises(WorkloadError, match="64-512"):
        poisson(1.0, 3, "lots", "5")


def test_trace_round_trip_and_bad_lines(tmp_path):
    reqs = poisson(3.0, 5, "32-64", "8", seed=1)
    path = tmp_path / "t.jsonl"
    save_trace(reqs, path)
    assert load_trace(path) == reqs
    path.write_text('{"arrival_time": 0, "prompt_len": 5}\n')
    with pytest.raises(WorkloadError, match="line 1: field output_len is missing"):
        load_trace(path)
    path.write_text('{"arrival_time": 0, "prompt_len": 5, "output_len": 1}\n{"arrival_time": -1, "prompt_len": 5,'
                    ' "output_len": 1}\n')
    with pytest.raises(WorkloadError, match="line 2: field arrival_time"):
        load_trace(path)
    path.write_text("not json\n")
    with pytest.raises(WorkloadError, match="not valid JSON"):
        load_trace(path)


def test_cli_serve_sweep_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["simulate", "serve", "-m", "llama-3-8b", "--rate", "1,4", "--num-requests", "12",
               "--prompt-len", "128", "--output-len", "16", "--json", str(out), "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 10_000
    runs = json.loads(out.read_text())["runs"]
    assert [r["rate"] for r in runs] == [1.0, 4.0] and all(r["num_finished"] == 12 for r in runs)


def test_cli_serve_compares_kv_policies_on_the_same_requests(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["simulate", "serve", "-m", "llama-3-8b", "--host", "ddr5-genoa", "--kv-policy", "plain,swap",
               "--kv-tiers", "device=256MiB,host=2GiB", "--max-model-len", "1536", "--rate", "inf",
               "--num-requests", "24", "--prompt-len", "256-1024", "--output-len", "32", "--json", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["policy"] for r in runs] == ["plain", "swap"] and all(r["num_finished"] == 24 for r in runs)
    assert runs[1]["link_bytes"] and not runs[0]["link_bytes"]  # swapping moves blocks over PCIe, plain never


def test_cli_unknown_kv_policy_lists_the_allowed_ones(capsys):
    assert main(["simulate", "serve", "--kv-policy", "plain,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown KV policy 'nope'" in err and "plain" in err and "Traceback" not in err


def test_cli_step_breakdown_plot_and_timeline(tmp_path, capsys):
    out, png, tl = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "t.png"
    rc = main(["simulate", "step", "-m", "llama-3-8b", "--host", "ddr5-genoa", "--host-share", "0.5",
               "--batch", "1,8", "--context", "512,2048", "--json", str(out), "--plot", str(png),
               "--timeline", str(tl)])
    assert rc == 0 and png.stat().st_size > 10_000 and tl.stat().st_size > 10_000
    points = json.loads(out.read_text())["points"]
    assert len(points) == 4 and points[-1]["timeline"]["streams"]["pcie:host>device"]["busy_s"] > 0
    assert "where the time goes" in capsys.readouterr().out


def test_cli_hardware_lists_and_shows(capsys):
    assert main(["simulate", "hardware"]) == 0
    assert "gh200" in capsys.readouterr().out
    assert main(["simulate", "hardware", "gh200"]) == 0
    assert "link c2c" in capsys.readouterr().out
