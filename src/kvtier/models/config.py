"""The llama-family shape kvtier runs, read from a Hugging Face config.

One dataclass for Llama 2/3, SmolLM2, Mistral and Qwen2: RoPE, GQA, RMSNorm, SwiGLU, optional
q/k/v bias (Qwen2) and tied embeddings. The simulator reads the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: Any = None  # the transformers config: RoPE parameters, chat defaults

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameters, counting a tied embedding once."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_layers
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        per_layer = attn + 3 * h * i + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * per_layer + embed + h

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V per token over all layers."""
        return 2 * self.num_layers * self.kv_size * torch.finfo(dtype).bits // 8

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim // 2] and the cos/sin scaling of the model's RoPE."""
        params = self.hf_config.rope_parameters
        if params.get("rope_type", "default") == "default":
            dim = self.head_dim
            exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
            return 1.0 / (params["rope_theta"] ** exps), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[params["rope_type"]](self.hf_config, None)


def _eos_ids(hf) -> list[int]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def model_config_from_hf(hf, source: str) -> ModelConfig:
    """Validate a transformers config and turn it into a ``ModelConfig``."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(hf, "architectures", None) or [str(model_type)])
        raise ModelLoadError(
            f"unsupported architecture {arch} in {source}",
            f"kvtier runs the llama family ({', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"unsupported activation {act!r} in {source}", "kvtier runs SwiGLU (silu) MLPs")
    rope_type = hf.rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported RoPE type {rope_type!r} in {source}",
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
        )
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    window = getattr(hf, "sliding_window", None)
    if model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        window = None
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
        sliding_window=window,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(hf),
        hf_config=hf,
    )
