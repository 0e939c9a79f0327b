"""Model shapes for the simulator, from the same sources as the engine: a named preset
(``kvtier.models.presets``), an HF folder or a ``config.json`` file. No weights are read."""

from __future__ import annotations

from pathlib import Path

from kvtier.errors import ModelLoadError
from kvtier.models.config import ModelConfig, model_config_from_hf
from kvtier.models.presets import PRESETS, preset_hf_config

DEFAULT_MODEL_SHAPE = "smollm2-135m"  # the engine's embedded default model, SmolLM2-135M-Instruct


def model_shape(model: str, overrides: dict | None = None) -> ModelConfig:
    name = DEFAULT_MODEL_SHAPE if model == "default" else model
    hf = preset_hf_config(name, overrides)
    if hf is not None:
        return model_config_from_hf(hf, name.lower())
    path = Path(model).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no model shape named '{model}'",
                             f"use an HF config.json, an HF folder, 'default' or one of: {', '.join(PRESETS)}")
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(str(folder), local_files_only=True, **(overrides or {}))
    except Exception as e:  # transformers raises ValueError/OSError/KeyError for bad configs
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {str(e).splitlines()[0]}",
                             "the file must be a transformers config.json of the llama family") from e
    return model_config_from_hf(hf, str(folder))
