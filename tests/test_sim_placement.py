"""The KV placement study: bounds hold (LP <= brute-force optimum <= every policy, unlimited above all),
baselines do what they say, the online policy is the engine's, traces load and scale, the CLI runs
and refuses bad input in one line."""

import itertools
import json

import numpy as np
import pytest

from kvtier.entrypoints.cli import main
from kvtier.kv.trace import FORMAT, encode_mass
from kvtier.sim.placement import bounds
from kvtier.sim.placement.annealing import Annealing, lookahead_schedule
from kvtier.sim.placement.baselines import AllHbm, Page16, Reactive, Static, first_write_set
from kvtier.sim.placement.model import Machine, Problem, Workload, evaluate
from kvtier.sim.placement.online import Online
from kvtier.sim.placement.recorded import load_recording, scale_recording
from kvtier.sim.placement.study import Settings, run
from kvtier.sim.placement.synthetic import SyntheticSpec, synthetic_trace
from kvtier.sim.placement.traces import AccessTrace, Grid, accessed

TOY_MACHINE = Machine("toy", 4e12, 4e12, 4e11, 4e11, 1e12)
POLICIES = [Static(), Reactive(), Page16(), Annealing(budget=60), Online()]


def toy_workload(groups: int = 2, batch: int = 1) -> Workload:
    return Workload("toy", groups, 1e6, 1e7, 0.0, 0.0, 1e5, batch)


def toy_problem(seed: int, variation: float, sparsity: float, slots: int = 2, machine=TOY_MACHINE) -> Problem:
    """3 simulated steps x 2 layer groups x 2 units: 4096 schedules, few enough to enumerate."""
    grid = Grid(prompt_tokens=20, decode_tokens=6, unit_tokens=16, stride=2, layer_groups=2)
    trace = synthetic_trace(grid, SyntheticSpec(variation=variation, spread=2.0, seed=seed))
    w = toy_workload()
    return Problem(trace, machine, w, slots * 16 * w.token_bytes, sparsity)


def brute_force(p: Problem) -> float:
    """The least T over every schedule the cost model accepts."""
    n, g, u = p.trace.shape
    exists = np.broadcast_to(p.trace.exists()[:, None, :], (n, g, u))
    best = np.inf
    for bits in itertools.product([False, True], repeat=n * g * u):
        x = np.array(bits).reshape(n, g, u)
        if np.any(x & ~exists) or x.sum(axis=(1, 2)).max() > p.slots:
            continue
        best = min(best, evaluate(p, x).seconds)
    return best


CASES = [(seed, var, sp) for seed, var, sp in [(0, 0.0, 0.5), (1, 1.0, 0.5), (2, 0.5, 0.0), (3, 1.0, 0.7)]]


@pytest.mark.parametrize("seed,variation,sparsity", CASES)
def test_lp_below_brute_force_below_every_policy(seed, variation, sparsity):
    p = toy_problem(seed, variation, sparsity)
    opt = brute_force(p)
    tol = 1e-9 * opt
    for window in (None, 1, 2):
        assert bounds.lp_bound(p, window).seconds <= opt + tol
    assert bounds.unlimited(p).seconds <= bounds.lp_bound(p).seconds + tol
    for policy in POLICIES:
        assert evaluate(p, policy.schedule(p)).seconds >= opt - tol, policy.name


def test_annealing_reaches_the_optimum_when_hot_units_stay_hot():
    """Stable importance and slow off-package memory: keeping each step's accessed units in HBM is
    optimal, and a look-ahead over the whole run finds it."""
    slow = Machine("slow-ext", 4e12, 4e12, 4e9, 4e9, 1e12)
    for seed in range(3):
        p = toy_problem(seed, 0.0, 0.5, machine=slow)
        opt = brute_force(p)
        assert evaluate(p, Annealing(budget=60).schedule(p)).seconds == pytest.approx(opt, rel=1e-9)


def test_static_is_first_write_and_never_moves():
    p = toy_problem(0, 0.5, 0.5, slots=3)
    x = Static().schedule(p)
    first = first_write_set(p).reshape(p.trace.shape[1:])
    assert np.array_equal(x, first[None] & p.trace.exists()[:, None, :])
    assert x[:, :, 0].all() and x.sum(axis=(1, 2)).max() == 3  # position 0 of every group first
    r = evaluate(p, x)
    assert r.bytes_in == r.bytes_out == 0


def test_schedules_respect_capacity_and_all_hbm_ignores_it():
    p = toy_problem(1, 1.0, 0.5, slots=1)
    for policy in POLICIES:
        assert policy.schedule(p).sum(axis=(1, 2)).max() <= 1
    assert AllHbm().schedule(p).sum(axis=(1, 2)).max() > 1


def test_lookahead_share_zero_keeps_its_first_placement():
    p = toy_problem(2, 1.0, 0.5)
    x = lookahead_schedule(p, 3, 0.0)
    assert evaluate(p, x).bytes_in == 0


def test_the_online_policy_is_the_engines_dynamic_policy(monkeypatch):
    from kvtier.kv.policies import dynamic
    from kvtier.sim.placement import online

    assert online.DynamicPolicy is dynamic.DynamicPolicy
    calls = []
    original = dynamic.DynamicPolicy.before_step
    monkeypatch.setattr(dynamic.DynamicPolicy, "before_step", lambda self, *a: calls.append(1) or original(self, *a))
    p = toy_problem(0, 0.5, 0.5)
    Online().schedule(p)
    assert len(calls) == p.trace.shape[0]


def test_accessed_set_is_the_top_share_of_existing_units():
    mass = np.array([[[0.5, 0.2, 0.3, 0.0]]], dtype=np.float32)  # [N=1, G=1, U=4]; unit 3 does not exist yet
    trace = AccessTrace(mass, np.array([1]), prompt_tokens=2, unit_tokens=1, source="t")
    assert accessed(trace, 0.5)[0, 0].tolist() == [True, False, True, False]  # ceil(0.5 * 3) = 2 units
    assert accessed(trace, 0.9)[0, 0].tolist() == [True, False, False, False]


def write_trace(path, steps: int = 12, layers: int = 4, heads: int = 2, block: int = 16, prompt: int = 200):
    """A trace in the engine's format: sink on block 0, recency on the last block, noise elsewhere."""
    rng = np.random.default_rng(0)
    header = {"format": FORMAT, "version": 1, "num_layers": layers, "num_kv_heads": heads, "num_heads": 2 * heads,
              "head_dim": 8, "block_size": block, "kv_bytes_per_token": 64, "model": "llama"}
    lines = [json.dumps(header)]
    for s in range(steps):
        ctx = prompt + s + 1
        nb = -(-ctx // block)
        m = rng.random((layers, heads, nb)) * 0.1
        m[..., 0] += 1.0
        m[..., -1] += 1.0
        m = 2 * m / m.sum(axis=-1, keepdims=True)
        seq = {"seq": 1, "request": "0", "context": ctx, "blocks": list(range(nb)), "mass": encode_mass(m)}
        lines.append(json.dumps({"step": s + 2, "seqs": [seq]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_recorded_trace_scales_keeping_sink_and_recency(tmp_path):
    rec = load_recording(write_trace(tmp_path / "t.jsonl"))
    assert rec.num_steps == 12 and rec.num_layers == 4
    grid = Grid(prompt_tokens=3000, decode_tokens=500, unit_tokens=128, stride=50, layer_groups=2)
    tr = scale_recording(rec, grid)
    assert tr.shape == (10, 2, 28)
    assert np.allclose(tr.mass.sum(axis=2), 1.0, atol=1e-5)
    last = (tr.context - 1) // grid.unit_tokens  # [N] the unit holding the newest token
    typical = np.median(tr.mass[:, :, 3:-3], axis=2)  # [N, G] a unit in the middle
    assert np.all(tr.mass[:, :, 0] > 5 * typical)  # the sink stays at the start
    recent = tr.mass[np.arange(10), :, last] + tr.mass[np.arange(10), :, last - 1]  # [N, G] the newest 2 units
    assert np.all(recent > 10 * typical)  # recency stays at the end


def test_lp_bounds_every_policy_on_a_recorded_like_and_a_synthetic_trace(tmp_path):
    grid = Grid(prompt_tokens=3000, decode_tokens=500, unit_tokens=128, stride=50, layer_groups=2)
    traces = [scale_recording(load_recording(write_trace(tmp_path / "t.jsonl")), grid),
              synthetic_trace(grid, SyntheticSpec(variation=0.3))]
    w = Workload("toy", 4, 4e7, 2e8, 1e7, 1e6, 4096 * 2, 4)
    for trace, sparsity in itertools.product(traces, (0.3, 0.8)):
        p = Problem(trace, TOY_MACHINE, w, 8 * 4 * 128 * 4096 * 2 * 2, sparsity)
        rows = {r["policy"]: r for r in run(p, ["unlimited", "static", "reactive", "page-16", "annealing",
                                                  "online", "lp"], Settings(lp_window=5))}
        for name, r in rows.items():
            assert rows["lp"]["tokens_per_s"] >= r["tokens_per_s"] * (1 - 1e-9) or name == "unlimited", name
            assert rows["unlimited"]["tokens_per_s"] >= r["tokens_per_s"] * (1 - 1e-9), name


SMALL = ["simulate", "placement", "--prompt-tokens", "2000", "--decode-tokens", "300", "--unit-tokens", "128",
         "--step-stride", "50", "--layer-groups", "4", "--hbm-kv", "0.5GB"]


def test_cli_prints_the_table_and_the_papers_ratio(capsys):
    assert main(SMALL + ["--policies", "static,reactive,annealing,online,lp"]) == 0
    out = capsys.readouterr().out
    assert "annealing / static" in out and "5.87x" in out and "LP bound" in out
    for name in ("static", "reactive", "annealing", "online", "lp"):
        assert name in out


def test_cli_sweep_writes_plot_and_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(SMALL + ["--policies", "static,reactive,lp", "--sweep", "capacity", "--values", "0.2GB,0.6GB",
                         "--plot", str(tmp_path), "--json", str(path)]) == 0
    assert (tmp_path / "placement_capacity.png").stat().st_size > 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["value"] for r in rows} == {0.2e9, 0.6e9} and len(rows) == 6


@pytest.mark.parametrize("args,words", [
    (["--trace", "/no/such/trace.jsonl"], ["not found", "--trace"]),
    (["--synthetic", "variance=0.3"], ["variance", "variation"]),
    (["--synthetic", "variation=lots"], ["number"]),
    (["--hbm-kv", "eight"], ["--hbm-kv"]),
    (["--sparsity", "1.5"], ["sparsity", "[0, 1)"]),
    (["--layer-groups", "5"], ["layer groups", "32"]),
    (["--policies", "static,lru"], ["lru", "reactive"]),
    (["--sweep", "sparsity", "--values", "0.5,x"], ["--values"]),
    (["--hardware", "h100-sxm"], ["host"]),
])
def test_cli_bad_input_is_one_clean_line(args, words, capsys):
    assert main(SMALL + args) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w.lower() in err[0].lower(), err[0]


def test_cli_refuses_a_file_that_is_not_a_trace(tmp_path, capsys):
    bad = tmp_path / "notes.jsonl"
    bad.write_text('{"hello": 1}\n')
    assert main(SMALL + ["--trace", str(bad)]) == 2
    assert "not a kvtier attention trace" in capsys.readouterr().err
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(SMALL + ["--trace", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err
    write_trace(bad)
    with bad.open("a") as f:
        f.write('{"step": 99, "seqs": [{"seq": 1}]}\n')
    assert main(SMALL + ["--trace", str(bad)]) == 2
    assert "not a readable kvtier attention trace" in capsys.readouterr().err
