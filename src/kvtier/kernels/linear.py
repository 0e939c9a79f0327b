"""Dense linear layers on CPU: a streaming GEMV for one row (batch-1 decode, at the memory
bandwidth), oneDNN prepacked weights for more rows; F.linear elsewhere.

MKL repacks the weight matrix on every call for small batches; packing once at load time makes
small-batch decode up to 1.5x faster (benchmarks/bench_generate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvtier.kernels import ext


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
