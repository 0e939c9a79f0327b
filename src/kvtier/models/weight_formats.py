"""Weight formats of the model (``EngineConfig.weights``): which format each tensor gets, converting
loaded weights into it, and the cache of the converted weights under the user cache dir.

- ``float32``: the plain float weights in the engine dtype (float32 on CPU): HF parity.
- ``bfloat16``, ``int8``, ``int4``: the linear layers in that format (``kernels/qlinear.py``). The
  embedding / LM head matrix uses the same format, except with ``int4`` where it stays ``int8`` (as
  llama.cpp's Q4 files keep their output matrix at 8 bits or more): its error reaches the logits directly.
  Norms and biases stay float.

From a GGUF file, Q8_0 / Q4_0 / Q4_1 tensors that match the wanted format are taken as they are stored
(Q4_1 -> int4 is lossless); the others are dequantized and quantized again. Safetensors weights are
quantized at load. Either way the result is cached (one safetensors file per source and format).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from kvtier.errors import ConfigError
from kvtier.kernels.qlinear import WEIGHT_FORMATS, QuantizedWeight, cat_quantized, quantize
from kvtier.utils.paths import cache_dir

WeightValue = torch.Tensor | QuantizedWeight
HEAD_FORMAT = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8", "int4": "int8"}
BITS = {"int8": 8, "int4": 4}
HEAD_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
CACHE_VERSION = 1  # bump when the cached layout changes


def tensor_format(name: str, fmt: str) -> str:
    """The format tensor ``name`` takes when the model runs with weights ``fmt``."""
    assert fmt in WEIGHT_FORMATS, fmt
    if name in HEAD_NAMES:
        return HEAD_FORMAT[fmt]
    return fmt if name.endswith("_proj.weight") else "float32"


def as_float(value: WeightValue) -> torch.Tensor:
    return value.dequantize() if isinstance(value, QuantizedWeight) else value.float()


def convert(name: str, value: WeightValue, fmt: str, dtype: torch.dtype) -> WeightValue:
    """``value`` in format ``fmt``: float32 -> a ``dtype`` tensor, bfloat16 -> a bfloat16 tensor,
    int8 / int4 -> a ``QuantizedWeight`` (kept as it is when it already has those bits)."""
    if fmt == "float32":
        return as_float(value).to(dtype) if isinstance(value, QuantizedWeight) else value.to(dtype)
    if fmt == "bfloat16":
        return as_float(value).to(torch.bfloat16)
    if isinstance(value, QuantizedWeight) and value.bits == BITS[fmt]:
        return value
    try:
        return quantize(as_float(value), BITS[fmt])
    except ConfigError as e:
        raise ConfigError(f"{name}: {e.problem}", e.fix) from e


def convert_weights(weights: dict[str, WeightValue], fmt: str, dtype: torch.dtype) -> dict[str, WeightValue]:
    return {name: convert(name, value, tensor_format(name, fmt), dtype) for name, value in weights.items()}


def cat_weights(parts: list[WeightValue]) -> WeightValue:
    """Stack along the output dimension (q/k/v, gate/up): all tensors or all ``QuantizedWeight``s."""
    if all(isinstance(p, QuantizedWeight) for p in parts):
        return cat_quantized(parts)
    return torch.cat([as_float(p) if isinstance(p, QuantizedWeight) else p for p in parts])


def to_device(weights: dict[str, WeightValue], device: torch.device, dtype: torch.dtype) -> dict[str, WeightValue]:
    """Move to ``device``; float32 tensors (norms, biases, float weights) take the engine ``dtype``."""
    out = {}
    for name, v in weights.items():
        if isinstance(v, QuantizedWeight):
            mins = None if v.mins is None else v.mins.to(device)
            out[name] = QuantizedWeight(v.bits, v.codes.to(device), v.scales.to(device), mins)
        else:
            out[name] = v.to(device=device, dtype=dtype if v.dtype == torch.float32 else v.dtype)
    return out


# ---- cache --------------------------------------------------------------------------------------------------

def source_key(files: list[Path]) -> str:
    """A content key of the source files (size and both ends of each, as the GGUF conversion cache)."""
    from kvtier.models.gguf import file_key

    return hashlib.sha256("|".join(file_key(f) for f in files).encode()).hexdigest()[:16]


def cache_path(name: str, files: list[Path], fmt: str) -> Path:
    return cache_dir("models") / f"{name}-{source_key(files)}-{fmt}-w{CACHE_VERSION}.safetensors"


def save_cache(path: Path, weights: dict[str, WeightValue], fmt: str) -> None:
    """One safetensors file: ``name`` for tensors, ``name#codes`` / ``#scales`` / ``#mins`` for quantized."""
    from safetensors.torch import save_file

    flat = {}
    for name, v in weights.items():
        if isinstance(v, QuantizedWeight):
            flat.update({f"{name}#codes": v.codes, f"{name}#scales": v.scales})
            if v.mins is not None:
                flat[f"{name}#mins"] = v.mins
        else:
            flat[name] = v.float() if v.dtype not in (torch.float32, torch.bfloat16) else v
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in flat.items()}, tmp, metadata={"weights": fmt})
        os.replace(tmp, path)  # atomic: a half-written file is never picked up
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_cache(path: Path) -> dict[str, WeightValue]:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    out: dict[str, WeightValue] = {}
    for key, t in flat.items():
        name, sep, part = key.partition("#")
        if not sep:
            out[name] = t
        elif part == "codes":
            bits = 8 if t.dtype == torch.int8 else 4
            out[name] = QuantizedWeight(bits, t, flat[f"{name}#scales"], flat.get(f"{name}#mins"))
    return out


def cached_convert(name: str, files: list[Path], fmt: str, read) -> dict[str, WeightValue]:
    """The weights of ``files`` in ``fmt`` (CPU, float tensors float32): from the cache, or ``read()``
    converted and cached."""
    path = cache_path(name, files, fmt)
    if path.is_file():
        return load_cache(path)
    weights = convert_weights(read(), fmt, torch.float32)
    save_cache(path, weights, fmt)
    return weights
