"""Hardware files: presets validate and cite a source for every number; bad input names the field."""

import pytest
import yaml

from kvtier.entrypoints.cli import main
from kvtier.sim.errors import HardwareError
from kvtier.sim.hardware import (
    load_hardware,
    load_system,
    merge,
    preset_names,
    read_raw,
    unsourced_numbers,
    validate_raw,
)

EXPECTED = {"h100-sxm", "h100-pcie", "h200", "a100-40gb", "a100-80gb", "a10g", "t4", "l4", "gh200", "ascend-910b",
            "ddr5-sapphire-rapids", "ddr5-genoa", "ddr5-turin"}


def test_the_presets_the_issue_asks_for_exist():
    assert EXPECTED <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_validates_and_every_number_has_a_source(name):
    raw, origin = read_raw(name)
    validate_raw(raw, origin)
    assert unsourced_numbers(raw) == []
    hw = load_hardware(name)
    assert hw.name == name == raw["name"]
    for proc in hw.processors.values():
        assert proc.memory in hw.memory
    for tier in hw.memory.values():
        assert tier.capacity > 0 and tier.read_bw > 0 and tier.write_bw > 0


def test_every_source_says_something():
    def sources(node):
        if isinstance(node, dict):
            yield from ([node["source"]] if "source" in node else [])
            for v in node.values():
                yield from sources(v)
        elif isinstance(node, list):
            for v in node:
                yield from sources(v)

    for name in preset_names():
        for s in sources(read_raw(name)[0]):
            assert len(s.strip()) >= 10, (name, s)


def test_devices_join_hosts_and_gh200_stands_alone():
    hw = load_system("h100-sxm", "ddr5-genoa")
    assert {"device", "host"} <= set(hw.memory)
    assert hw.link("host", "device").forward == pytest.approx(35.2e9)
    assert "nvlink" not in hw.links  # its far end (a peer GPU) is not a tier of this system
    gh = load_system("gh200")
    assert gh.tier("host").capacity == pytest.approx(480e9) and gh.link("device", "host").rate("host", "device") > 3e11
    with pytest.raises(HardwareError, match="defined in both"):
        merge(load_hardware("gh200"), load_hardware("ddr5-genoa"))


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(HardwareError) as e:
        load_hardware("h100")
    assert "unknown hardware 'h100'" in str(e.value) and "h100-sxm" in str(e.value) and "local" in str(e.value)


def test_missing_local_profile_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    with pytest.raises(HardwareError, match="kvtier profile"):
        load_hardware("local")


def _write(tmp_path, raw) -> str:
    p = tmp_path / "hw.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


@pytest.mark.parametrize("edit, words", [
    (lambda r: r["processors"]["device"].update(speed=1), ["processors.device", "speed", "allowed", "peak_flops"]),
    (lambda r: r["processors"]["device"]["peak_flops"].update(bfloat17={"value": 1, "source": "x" * 5}),
     ["peak_flops", "bfloat17", "allowed", "bfloat16"]),
    (lambda r: r["memory"]["device"]["capacity"].update(value="80 parsecs"),
     ["memory.device.capacity", "80 parsecs", "GiB"]),
    (lambda r: r["memory"]["device"]["read_bandwidth"].pop("source"),
     ["memory.device.read_bandwidth", "source", "missing"]),
    (lambda r: r.update(role="gpu"), ["role", "allowed", "device, host, machine"]),
    (lambda r: r["processors"]["device"].update(kind="fpga"), ["processors.device.kind", "gpu, cpu, npu"]),
    (lambda r: r["processors"]["device"]["efficiency"]["matmul"].update(value=1.5), ["efficiency.matmul", "(0, 1]"]),
])
def test_malformed_file_names_the_field_and_the_allowed_values(tmp_path, edit, words):
    raw, _ = read_raw("h100-sxm")
    edit(raw)
    with pytest.raises(HardwareError) as e:
        load_hardware(_write(tmp_path, raw))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_not_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2")
    with pytest.raises(HardwareError, match="cannot read hardware file"):
        load_hardware(str(p))
    p.write_text("- 1\n- 2\n")
    with pytest.raises(HardwareError, match="not a mapping"):
        load_hardware(str(p))


def test_host_alone_cannot_run_a_model():
    with pytest.raises(HardwareError, match="no 'device' processor"):
        load_system("ddr5-genoa")


def test_cli_bad_hardware_is_one_clean_line(capsys):
    assert main(["simulate", "step", "--hardware", "h100", "--batch", "1", "--context", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown hardware 'h100'") and "h100-sxm" in err[0]
