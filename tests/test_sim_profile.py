"""``kvtier profile``: its measurements are positive and shaped right, and the file it writes loads."""

import pytest
import torch
import yaml

from kvtier.entrypoints.cli import main
from kvtier.sim import profile as prof
from kvtier.sim.hardware import PRESET_DIR, load_system
from kvtier.sim.machine_file import to_yaml
from kvtier.sim.model_shape import model_shape


def test_memory_and_matmul_measurements_are_sane():
    mem = prof.memory_bandwidth(torch.device("cpu"), 16, 2)
    assert all(v > 1e8 for v in mem.values())
    rows, rates = prof.matmul_curve(torch.float32, torch.device("cpu"), (1, 4, 16), 1, (64, 128), 2**20)
    assert rows == [1, 4, 16] and all(r > 1e6 for r in rates)


def test_attention_fits_are_positive():
    tiny = model_shape("tiny-llama")
    bw, per_seq, per_call = prof.decode_attention(tiny, torch.float32, True, 1, 0.0)
    assert bw > 1e8 and per_seq >= 0 and per_call >= 0
    lengths, causal, masked = prof.prefill_attention(tiny, torch.float32, True, 1, 0.0)
    assert lengths == sorted(lengths) and len(causal) == len(lengths) and min(causal) > 1e6 and masked > 1e6


def test_call_overheads_and_sampler():
    one_row, more_rows = prof.matmul_call_overhead(torch.device("cpu"), 2)
    assert 0 < one_row and 0 < more_rows
    cost = prof.sampling_costs(512, torch.device("cpu"), 2)
    assert set(cost) == {"call", "greedy", "random"} and all(v >= 0 for v in cost.values())


def test_yaml_writer_keeps_quantities_on_one_line_and_round_trips():
    raw = {"schema_version": 1, "name": "x", "role": "machine",
           "processors": {"device": {"kind": "cpu", "memory": "device",
                                     "matmul_curves": {"float32": [{"rows": [1, 8], "flops": ["1 GFLOP/s", "9 GFLOP/s"],
                                                                    "shape": [64, 64], "source": "measured: test"}]}}},
           "memory": {"device": {"capacity": {"value": "1 GiB", "source": "measured: test"},
                                 "read_bandwidth": {"value": "10 GB/s", "source": "measured: test"}}}}
    text = to_yaml(raw)
    assert "capacity: {value: 1 GiB, source: 'measured: test'}" in text and "rows: [1, 8]" in text
    assert yaml.safe_load(text) == raw


@pytest.mark.slow
def test_linears_in_situ_give_a_matmul_efficiency_within_bounds():
    raw = yaml.safe_load((PRESET_DIR / "ddr5-genoa.yaml").read_text())  # a CPU with no curves: peak FLOP/s
    raw["processors"]["device"] = {**raw["processors"].pop("cpu"),
                                   "peak_flops": {"float32": {"value": "50 GFLOP/s", "source": "assumption: test"}}}
    raw["memory"]["device"] = raw["memory"].pop("host")
    raw["processors"]["device"]["memory"] = "device"
    eff = prof.matmul_in_situ(raw, "tiny-llama", "float32", 1)
    assert 0.5 <= eff <= 1.0


def test_llc_size_is_read():
    assert prof.llc_bytes() >= 2**20


def test_bad_dtype_is_a_clean_error(capsys):
    assert main(["profile", "--dtypes", "float64"]) == 2
    err = capsys.readouterr().err
    assert "float64" in err and "bfloat16" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_quick_profile_writes_a_file_the_simulator_uses(tmp_path, capsys):
    path = tmp_path / "me.yaml"
    assert main(["profile", "--quick", "--repeats", "1", "-o", str(path)]) == 0
    hw = load_system(str(path))
    dev = hw.processor("device")
    assert dev.kind in ("cpu", "gpu") and dev.curves["float32"][0].rows[0] == 1 and dev.overheads["op"] >= 0
    assert main(["simulate", "step", "-H", str(path), "--batch", "1,4", "--context", "64"]) == 0
