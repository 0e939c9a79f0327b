"""Engine options shared by every command that runs a model: ``@engine_options`` adds them."""

from __future__ import annotations

import json

import click

from kvtier.config import KV_DTYPES, EngineConfig
from kvtier.kernels.qlinear import WEIGHT_FORMATS


def _kv_pairs(ctx, param, values) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _json_obj(ctx, param, value) -> dict:
    if not value:
        return {}
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"num_hidden_layers\": 2}'")
    return obj


FAST_WEIGHTS = "int8"  # the default of compare and serve on a CPU

ENGINE_OPTIONS = [
    click.option("--model", "-m", default="default", show_default=True,
                 help="'default' (SmolLM2-135M-Instruct), an HF model folder, a .gguf file, or with "
                      "--load-format dummy a named shape (llama-3-8b, ...)"),
    click.option("--load-format", type=click.Choice(["auto", "dummy"]), default="auto", show_default=True,
                 help="dummy: random weights for the model's shape"),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True, help="weights and KV dtype (auto: float32 on CPU, bfloat16 on CUDA)"),
    click.option("--weights", type=click.Choice(["auto", *WEIGHT_FORMATS]), default="auto", show_default=True,
                 help="weight format of the linear layers: float32 (in --dtype, HF parity), bfloat16, or "
                      "weight-only int8 / int4 (groups of 32; GGUF Q8_0 / Q4_x tensors load as they are). "
                      f"auto: {FAST_WEIGHTS} for compare and serve on a CPU (the fastest format that passes "
                      "the accuracy gate), float32 elsewhere"),
    click.option("--kv-dtype", type=click.Choice(["auto", *KV_DTYPES]), default="auto",
                 show_default=True, help="KV cache format (auto: the model's dtype); 16-bit halves the KV bytes "
                                         "read; hack2/4/8: HACK codes of 2/4/8 bits, attention on the codes (lossy)"),
    click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]"),
    click.option("--max-model-len", type=int, default=None, help="context length (default: the model's)"),
    click.option("--block-size", type=int, default=None, help="tokens per KV block (default 16; 64 with HACK KV)"),
    click.option("--kv-cache-memory", default="auto", show_default=True,
                 help="bytes for the KV pool, e.g. 2GiB (auto: 4 GiB on CPU, 80%% of free GPU memory)"),
    click.option("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides memory)"),
    click.option("--kv-policy", default="plain", show_default=True, help="where KV blocks live (see compare)"),
    click.option("--kv-policy-option", "kv_policy_options", multiple=True, callback=_kv_pairs,
                 metavar="KEY=VALUE", help="an option of the KV policy (repeatable)"),
    click.option("--kv-tiers", default=None, metavar="TIER=SIZE,...",
                 help="KV budget per memory tier, e.g. device=2GiB,host=16GiB,disk=64GiB (or Nblocks); "
                      "device replaces --kv-cache-memory"),
    click.option("--kv-disk-dir", default=None, type=click.Path(file_okay=False),
                 help="directory of the disk tier's memory-mapped file (default: the user cache dir)"),
    click.option("--trace", "kv_trace", default=None, type=click.Path(dir_okay=False),
                 help="write the attention mass per step, layer, KV head and block to this JSONL file"),
    click.option("--max-num-seqs", type=int, default=64, show_default=True, help="sequences per step"),
    click.option("--max-num-batched-tokens", type=int, default=1024, show_default=True,
                 help="token budget per step (prefill chunks + decodes)"),
    click.option("--seed", type=int, default=0, show_default=True, help="engine seed for unseeded sampling"),
    click.option("--hf-overrides", callback=_json_obj, default=None,
                 help="JSON fields that override the model config, e.g. '{\"num_hidden_layers\": 2}'"),
    click.option("--threads", "num_threads", type=int, default=None, help="CPU threads (default: all cores)"),
]


def engine_options(f):
    for option in reversed(ENGINE_OPTIONS):
        f = option(f)
    return f


def engine_config(kw: dict, fast: bool = False) -> EngineConfig:
    """An EngineConfig from a command's keyword arguments (engine options only). ``fast``: a serving
    command (compare, serve), whose ``--weights auto`` is FAST_WEIGHTS on a CPU with real weights (int8
    passes the gate of >= 95% teacher-forced next-token agreement with float32, and the int kernels are
    CPU ones); elsewhere auto is float32 (HF parity; quantizing random ``dummy`` weights only costs time)."""
    fields = engine_kwargs(dict(kw))
    config = EngineConfig(**fields)
    if fast and kw.get("weights") == "auto" and config.torch_device().type == "cpu" and config.load_format != "dummy":
        config.weights = FAST_WEIGHTS
    return config


def engine_kwargs(kw: dict) -> dict:
    """Take the engine options out of a command's keyword arguments (``--weights auto``: float32)."""
    names = set(EngineConfig.__slots__)
    out = {k: kw.pop(k) for k in list(kw) if k in names}
    if out.get("weights") == "auto":
        out["weights"] = "float32"
    return out
