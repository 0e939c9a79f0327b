"""Dense linear layers on CPU: a streaming GEMV for one row (batch-1 decode, at the memory
bandwidth); for more rows kvtier's float32 panels (``csrc/qlinear.cpp``: 48 output columns per panel,
the next panel prefetched) on CPUs with AVX-512 VNNI (qlinear's "avx512" kernels), oneDNN prepacked
weights elsewhere; F.linear on other devices.

MKL repacks the weight matrix on every call for small batches; packing once at load time makes
small-batch decode up to 1.5x faster, and kvtier's panels beat oneDNN's packed GEMM where decode
streams the weights from memory (1.1-1.3x at 32 rows, 1.4-1.7x at 8 rows, Zen 5;
benchmarks/bench_generate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.kernels import ext

F32_PANEL = 48  # output columns per panel of kvtier's float32 GEMM


def _panel_kernels():
    """The compiled module whose float32 panel GEMM has a vector kernel on this CPU (AVX-512 VNNI), or None."""
    fast = ext.load("qlinear")
    return fast if fast is not None and fast.isa() == "avx512" else None


def pack_panels(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] float32 as kvtier's panels [P, in, 48] (columns padded with zeros to P * 48),
    or None where that kernel does not run (another dtype or device, no AVX-512 VNNI)."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or _panel_kernels() is None:
        return None
    n, k = weight.shape
    p = -(-n // F32_PANEL)
    w = F.pad(weight, (0, 0, 0, p * F32_PANEL - n))
    return w.view(p, F32_PANEL, k).transpose(1, 2).contiguous()


def panel_linear(x: torch.Tensor, panels: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in] float32, panels: pack_panels(weight [out, in]) -> [T, out]
    fast = ext.load("qlinear")
    if fast is None:  # the compiled modules turned off after packing (the tests' reference path)
        return F.linear(x, weight, bias)
    return fast.f32_linear(x, panels, bias, weight.shape[0])


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of ``weight`` [out, in], or None where packing is unavailable."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (RuntimeError, AttributeError):  # e.g. bf16 packing needs AVX512-BF16/AVX-NE-CONVERT
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in] -> [T, out]
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [T, in], weight: [out, in] -> [T, out]
    if x.shape[0] == 1 and x.dtype == torch.float32 and weight.device.type == "cpu" and weight.is_contiguous():
        fast = ext.load()
        if fast is not None:
            return fast.gemv(x, weight, bias)
    return F.linear(x, weight, bias)
