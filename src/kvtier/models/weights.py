"""Weights by Hugging Face name: shapes from a config, loading from safetensors, random init."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kvtier.errors import ModelLoadError
from kvtier.models.config import ModelConfig


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass needs, by HF name (a tied LM head is not listed)."""
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Random weights of the right shapes (``--load-format dummy``): N(0, 0.02), norms at one."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in weight_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=dtype, device=device) if "norm" in name else \
                torch.zeros(shape, dtype=dtype, device=device)
        else:
            out[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)
    return out


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"corrupt {index}: {e}", "restore the file from the model's repository") from e
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors weights in {folder}",
            "kvtier reads safetensors or GGUF; convert .bin checkpoints with transformers' save_pretrained",
        )
    return files


def load_safetensors(folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Load the tensors ``weight_shapes`` lists from a model folder, checking names and shapes."""
    from safetensors import SafetensorError, safe_open

    wanted = weight_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(folder):
        if not path.is_file():
            raise ModelLoadError(f"missing weight shard {path}", "download the complete model folder")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in wanted:
                        out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"cannot read {path}: {e}", "the file is corrupt or truncated; download it again") \
                from e
    return check_weights(out, wanted, folder)


def check_weights(out: dict, wanted: dict[str, tuple[int, ...]], source) -> dict:
    """``out`` restricted to the ``wanted`` names, each present with its shape (tensors or quantized)."""
    missing = [n for n in wanted if n not in out]
    if missing:
        raise ModelLoadError(f"{source} lacks {len(missing)} weights, e.g. {missing[0]}",
                             "check that the folder holds the complete model")
    for name, shape in wanted.items():
        if tuple(out[name].shape) != shape:
            raise ModelLoadError(f"weight {name} has shape {tuple(out[name].shape)}, the config says {shape}",
                                 "the weights do not match config.json")
    return {name: out[name] for name in wanted}
