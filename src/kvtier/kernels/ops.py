"""Elementwise and normalization ops of the forward pass: compiled on CPU, plain torch elsewhere.

Each op has one reference in torch (the arithmetic of HF's Llama modules) and a fused CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.kernels import ext


def _fast(t: torch.Tensor):
    return ext.load() if t.device.type == "cpu" else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [T, H] -> [T, H]
    fast = _fast(x)
    if fast is not None:
        return fast.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()  # HF's LlamaRMSNorm: normalize in float32, scale in the model dtype
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream ``h + x`` and its RMSNorm; h [T, H] may be updated in place."""
    fast = _fast(h)
    if fast is not None and h.is_contiguous():
        return h, fast.add_rms_norm(h, x, weight, eps)
    h = h + x
    return h, rms_norm_reference(h, weight, eps)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (unit stride on D) in place at ``positions`` [T].

    cos, sin_signed: [P, D] tables with sin_signed = (-sin, sin) over the two halves, so that
    x * cos + rotate_half(x) * sin (HF's half-split RoPE) is x * cos + swap_halves(x) * sin_signed.
    """
    fast = _fast(x)
    if fast is not None:
        fast.rope_(x, cos, sin_signed, positions)
        return x
    c, s = cos[positions].unsqueeze(1), sin_signed[positions].unsqueeze(1)
    half = x.shape[-1] // 2
    x.copy_(x * c + torch.cat((x[..., half:], x[..., :half]), dim=-1) * s)
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2I] -> silu(gate) * up: [T, I]
    fast = _fast(gate_up)
    if fast is not None:
        return fast.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
