"""kvtier's forward pass for the llama family, over kvtier's paged KV cache.

Tokens of a step arrive flattened (``T`` tokens from all sequences, decode tokens first); only
attention looks at sequence boundaries, through ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.kernels import ops
from kvtier.kernels.linear import linear, pack_weight, packed_linear
from kvtier.kv.cache import AttentionMetadata, PagedKVCache
from kvtier.models.config import ModelConfig


class Linear:
    """``y = x @ W^T + b``. On CPU a oneDNN-packed copy of the weight serves batches of two rows or
    more; one row streams the plain weight (GEMV). Weight formats (int8, int4...) subclass this."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.out_features, self.in_features = weight.shape  # weight: [out, in]
        self.weight = weight.contiguous()
        self.bias = bias
        self.nbytes = sum(t.numel() * t.element_size() for t in (weight, bias) if t is not None)
        self.packed = pack_weight(weight) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 1:
            return packed_linear(x, self.packed, self.bias)
        return linear(x, self.weight, self.bias)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    qkv: Linear  # [Hq*D + 2*Hkv*D, H]
    o: Linear  # [H, Hq*D]
    post_norm: torch.Tensor  # [H]
    gate_up: Linear  # [2*I, H]
    down: Linear  # [H, I]


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.embed = weights.pop("model.embed_tokens.weight")  # [V, H]
        self.norm = weights.pop("model.norm.weight")
        head = weights.pop("lm_head.weight", None)
        self.lm_head = Linear(self.embed if head is None or cfg.tie_word_embeddings else head)
        self.layers = [self._layer(weights, i) for i in range(cfg.num_layers)]
        assert not weights, f"unused weights: {sorted(weights)[:5]}"
        inv_freq, scaling = cfg.rope_inv_freq()
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        dtype, device = self.embed.dtype, self.embed.device
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)
        sin = emb.sin() * scaling
        half = sin.shape[-1] // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype=dtype, device=device)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        qkv_w = torch.cat([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_b = None
        if self.cfg.qkv_bias:
            qkv_b = torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        gate_up = torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
        return LayerWeights(
            input_norm=w.pop(p + "input_layernorm.weight"),
            qkv=Linear(qkv_w, qkv_b),
            o=Linear(w.pop(p + "self_attn.o_proj.weight"), w.pop(p + "self_attn.o_proj.bias", None)),
            post_norm=w.pop(p + "post_attention_layernorm.weight"),
            gate_up=Linear(gate_up),
            down=Linear(w.pop(p + "mlp.down_proj.weight")),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights a decode step reads: every layer, the final norm and the LM head rows."""
        per_layer = sum(lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        norms = sum(2 * layer.input_norm.numel() * layer.input_norm.element_size() for layer in self.layers)
        return per_layer + norms + self.lm_head.nbytes

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv: PagedKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] after the final norm
        eps = self.cfg.rms_norm_eps
        h = F.embedding(input_ids, self.embed)  # [T, H] residual stream
        x = ops.rms_norm(h, self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            h, x = ops.add_rms_norm(h, self._attention(i, layer, x, positions, kv, meta), layer.post_norm, eps)
            out = layer.down(ops.silu_mul(layer.gate_up(x)))
            norm = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm
            h, x = ops.add_rms_norm(h, out, norm, eps)
        return x

    def _attention(self, i, layer: LayerWeights, x, positions, kv: PagedKVCache, meta) -> torch.Tensor:
        cfg, t = self.cfg, x.shape[0]
        qkv = layer.qkv(x)  # [T, (Hq + 2 Hkv) * D]
        qk = ops.rope_(qkv[:, : cfg.q_size + cfg.kv_size].view(t, -1, cfg.head_dim), self.cos, self.sin_signed,
                       positions)  # q and k rotated at once, in place
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, cfg.q_size + cfg.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
        o = kv.attend(i, q, k, v, meta)  # [T, Hq, D]
        return layer.o(o.reshape(t, cfg.q_size))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] float32
        return self.lm_head(hidden).float()
