"""kvtier's forward pass for the llama family, over kvtier's paged KV cache.

Tokens of a step arrive flattened (``T`` tokens from all sequences, decode tokens first); only
attention looks at sequence boundaries, through ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.kernels import ops
from kvtier.kernels.linear import linear, pack_panels, pack_weight, packed_linear, panel_linear
from kvtier.kernels.qlinear import BF16Linear, IntLinear, QuantizedWeight
from kvtier.kv.cache import AttentionMetadata, TieredKVCache
from kvtier.models.config import ModelConfig
from kvtier.models.weight_formats import HEAD_FORMAT, cat_weights


class Linear:
    """``y = x @ W^T + b``. On CPU a packed copy of the weight serves batches of two rows or more:
    kvtier's float32 panels on AVX-512 CPUs, else oneDNN's; one row streams the plain weight (GEMV).
    The other weight formats (``kernels/qlinear.py``) have the same interface: ``__call__``, ``rows``
    (embedding lookup), ``nbytes``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.out_features, self.in_features = weight.shape  # weight: [out, in]
        self.weight = weight.contiguous()
        self.bias = bias
        self.nbytes = sum(t.numel() * t.element_size() for t in (weight, bias) if t is not None)
        self.panels = pack_panels(self.weight) if pack else None
        self.packed = pack_weight(weight) if pack and self.panels is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and self.panels is not None:
            return panel_linear(x, self.panels, self.weight, self.bias)
        if x.shape[0] > 1 and self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, in]
        return F.embedding(ids, self.weight)


def make_linear(w: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None, fmt: str, pack: bool = True):
    """The layer for a weight already in format ``fmt`` (``models/weight_formats.py``)."""
    if fmt == "float32":
        return Linear(w, bias, pack)
    if fmt == "bfloat16":
        return BF16Linear(w, bias)
    assert isinstance(w, QuantizedWeight), f"{fmt} weights arrive quantized"
    return IntLinear(w, bias)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # [Hq*D + 2*Hkv*D, H]
    o: Linear  # [H, Hq*D]
    post_norm: torch.Tensor  # [H]
    gate_up: Linear  # [2*I, H]
    down: Linear  # [H, I]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict, weight_format: str = "float32"):
        """``weights``: by HF name, already in ``weight_format`` (``models/weight_formats.py``)."""
        self.cfg = cfg
        self.weight_format = weight_format
        embed = weights.pop("model.embed_tokens.weight")  # [V, H]
        self.norm = weights.pop("model.norm.weight")
        self.dtype, self.device = self.norm.dtype, self.norm.device  # activations: the float weights' dtype
        head = weights.pop("lm_head.weight", None)
        head_format = HEAD_FORMAT[weight_format]
        if head is None or cfg.tie_word_embeddings:
            self.lm_head = self.embedding = make_linear(embed, None, head_format)
        else:
            self.lm_head = make_linear(head, None, head_format)
            self.embedding = make_linear(embed, None, head_format, pack=False)
        self.layers = [self._layer(weights, i) for i in range(cfg.num_layers)]
        assert not weights, f"unused weights: {sorted(weights)[:5]}"
        inv_freq, scaling = cfg.rope_inv_freq()
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        dtype, device = self.dtype, self.device
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)
        sin = emb.sin() * scaling
        half = sin.shape[-1] // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype=dtype, device=device)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        fmt = self.weight_format
        qkv_w = cat_weights([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_b = None
        if self.cfg.qkv_bias:
            qkv_b = torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        gate_up = cat_weights([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
        return LayerWeights(
            input_norm=w.pop(p + "input_layernorm.weight"),
            qkv=make_linear(qkv_w, qkv_b, fmt),
            o=make_linear(w.pop(p + "self_attn.o_proj.weight"), w.pop(p + "self_attn.o_proj.bias", None), fmt),
            post_norm=w.pop(p + "post_attention_layernorm.weight"),
            gate_up=make_linear(gate_up, None, fmt),
            down=make_linear(w.pop(p + "mlp.down_proj.weight"), None, fmt),
        )

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the LM head rows."""
        per_layer = sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        norms = sum(2 * layer.input_norm.numel() * layer.input_norm.element_size() for layer in self.layers)
        return per_layer + norms + self.lm_head.nbytes

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: TieredKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] after the final norm
        eps = self.cfg.rms_norm_eps
        h = self.embedding.rows(input_ids).to(self.dtype)  # [T, H] residual stream
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            h, x = ops.add_rms_norm(h, self._attention(i, layer, x, positions, kv, meta), layer.post_norm, eps)
            out = layer.down(ops.silu_mul(layer.gate_up(x)))
            norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, x = ops.add_rms_norm(h, out, norm, eps)
        return x

    def _attention(self, i, layer: LayerWeights, x, positions, kv: TieredKVCache, meta) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        heads = layer.qkv(x).view(t, -1, cfg.head_dim)  # [T, Hq + 2 Hkv, D]
        qk, v = heads.split([cfg.num_heads + cfg.num_kv_heads, cfg.num_kv_heads], dim=1)
        ops.rope_(qk, self.cos, self.sin_signed, positions)  # q and k rotated at once, in place
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        o = kv.attend(i, q, k, v, meta)  # [T, Hq, D]
        return layer.o(o.reshape(t, cfg.q_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] float32
        return self.lm_head(hidden).float()
