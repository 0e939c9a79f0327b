"""Weight-only linear layers on CPU: bfloat16, int8 and int4 weights, float32 activations in and out.

Formats (``WEIGHT_FORMATS``; ``float32`` is the plain ``Linear`` of ``models/llama.py``):

- ``bfloat16``: the weight rounded to bfloat16 (2 bytes per weight). Products and sums in float32.
- ``int8``: groups of 32 along the input dimension, symmetric: ``w = d * q``, ``q`` in -127..127, one
  float16 ``d`` per group (8.5 bits per weight): GGUF's Q8_0.
- ``int4``: groups of 32, asymmetric: ``w = d * q + m``, ``q`` in 0..15, float16 ``d`` and ``m`` per group
  (5 bits per weight): GGUF's Q4_1 (and Q4_0 as ``m = -8 d``), so Q4 files load without loss.

Kernels (``csrc/qlinear.cpp``): int8/int4 quantize each activation row per group of 32 to int8 (as
llama.cpp does: the formats are lossy in activations too) and compute integer dot products (AVX2
``vpmaddubsw``); bfloat16 widens the weights in registers. The same kernel serves batch-1 decode (it
streams the packed weights at the memory bandwidth) and batches (the weights are unpacked once per
group for every row). Where the compiled module is unavailable the layers dequantize their weight
once to float32 and use ``F.linear`` (correct, but without the memory saving).

Packed layouts (what the kernels read), with ``P`` panels of output columns and ``G = K / 32`` groups:

- int4: ``[P, G, 160]`` uint8, 8 columns per panel: byte ``32 j + 4 c + kk`` (``j < 4``) holds column
  ``c``'s codes of k = ``4 j + kk`` (low nibble) and ``16 + 4 j + kk`` (high nibble); then ``d[8]``,
  ``m[8]`` as float16.
- int8: ``[P, G, 272]`` uint8: byte ``32 j + 4 c + kk`` (``j < 8``) is column ``c``'s code of k =
  ``4 j + kk``; then ``d[8]`` as float16.
- bfloat16: ``[P, K, 16]``, 16 columns per panel stored interleaved (element ``2 i`` is column ``i``,
  ``2 i + 1`` column ``8 + i``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvtier.errors import ConfigError
from kvtier.kernels import ext
from kvtier.kernels.linear import pack_weight, packed_linear

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4")
GROUP = 32  # quantization group along the input dimension
INT_PANEL, BF16_PANEL = 8, 16  # output columns per packed panel
_BF16_ORDER = [c for i in range(8) for c in (i, 8 + i)]  # panel element -> column


@dataclass(slots=True)
class QuantizedWeight:
    """A group-wise quantized weight [N, K] in plain (unpacked) form: what is cached on disk and
    concatenated (q/k/v, gate/up) before packing."""

    bits: int  # 8 (symmetric) or 4 (asymmetric)
    codes: torch.Tensor  # [N, K]: int8 in -127..127 (bits 8) or uint8 in 0..15 (bits 4)
    scales: torch.Tensor  # [N, K / 32] float16
    mins: torch.Tensor | None = None  # [N, K / 32] float16 for bits 4, None for bits 8

    def __post_init__(self):
        n, k = self.codes.shape
        assert self.bits in (4, 8) and k % GROUP == 0 and self.scales.shape == (n, k // GROUP)
        assert (self.mins is not None) == (self.bits == 4)
        assert self.codes.dtype == (torch.uint8 if self.bits == 4 else torch.int8)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (or its ``rows``): d * q (+ m), exactly as GGUF dequantizes."""
        codes, scales = (self.codes, self.scales) if rows is None else (self.codes[rows], self.scales[rows])
        n, k = codes.shape
        w = codes.float().view(n, k // GROUP, GROUP) * scales.float().unsqueeze(-1)
        if self.mins is not None:
            w = w + (self.mins if rows is None else self.mins[rows]).float().unsqueeze(-1)
        return w.view(n, k)


def check_groups(shape: tuple[int, ...], fmt: str) -> None:
    """Int formats need the input dimension in whole groups of 32."""
    if len(shape) != 2 or shape[1] % GROUP:
        raise ConfigError(f"cannot pack a weight of shape {tuple(shape)} as {fmt}: its input dimension must be a "
                          f"multiple of {GROUP}", "use --weights bfloat16 or float32 for this model")


def quantize_int8(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 per group of 32 (GGUF Q8_0's rule: d = max|w| / 127, q = round(w / d))."""
    check_groups(w.shape, "int8")
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    d = (g.abs().amax(-1) / 127).half()  # [N, G]
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros(()))
    q = torch.round(g * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(8, q.view(n, k), d)


def quantize_int4(w: torch.Tensor) -> QuantizedWeight:
    """Asymmetric int4 per group of 32 (GGUF Q4_1's rule: d = (max - min) / 15, m = min)."""
    check_groups(w.shape, "int4")
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()  # [N, G]
    inv = torch.where(d.float() > 0, 1.0 / d.float(), torch.zeros(()))
    q = torch.round((g - m.float().unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return QuantizedWeight(4, q.view(n, k), d, m)


def quantize(w: torch.Tensor, bits: int) -> QuantizedWeight:
    return quantize_int4(w) if bits == 4 else quantize_int8(w)


def cat_quantized(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dimension (q/k/v into one, gate/up into one)."""
    assert len({p.bits for p in parts}) == 1
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return QuantizedWeight(parts[0].bits, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           mins)


# ---- packing into the kernels' layouts ----------------------------------------------------------------------

def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return t if extra == 0 else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])


def _panel_meta(t: torch.Tensor) -> torch.Tensor:  # [N, G] float16 -> [P, G, 16] uint8
    t = _pad_rows(t, INT_PANEL)
    p, g = t.shape[0] // INT_PANEL, t.shape[1]
    return t.view(p, INT_PANEL, g).permute(0, 2, 1).contiguous().view(torch.uint8).view(p, g, 2 * INT_PANEL)


def pack_int(qw: QuantizedWeight) -> torch.Tensor:
    """The kernels' layout: [P, G, 160] (int4) or [P, G, 272] (int8) uint8."""
    codes = _pad_rows(qw.codes, INT_PANEL).view(torch.uint8)
    p, g = codes.shape[0] // INT_PANEL, codes.shape[1] // GROUP
    if qw.bits == 4:
        c = codes.view(p, INT_PANEL, g, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)  # [P, G, half, j, c, kk]
        body = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(p, g, 128)
        return torch.cat([body, _panel_meta(qw.scales), _panel_meta(qw.mins)], dim=-1).contiguous()
    body = codes.view(p, INT_PANEL, g, 8, 4).permute(0, 2, 3, 1, 4).reshape(p, g, 256)  # [P, G, j, c, kk]
    return torch.cat([body, _panel_meta(qw.scales)], dim=-1).contiguous()


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """The kernels' layout: [P, K, 16] bfloat16, columns interleaved within a panel."""
    w = _pad_rows(w.to(torch.bfloat16), BF16_PANEL)
    p, k = w.shape[0] // BF16_PANEL, w.shape[1]
    return w.view(p, BF16_PANEL, k)[:, _BF16_ORDER].transpose(1, 2).contiguous()


# ---- layers -------------------------------------------------------------------------------------------------

def _kernels(t: torch.Tensor):
    return ext.load("qlinear") if t.device.type == "cpu" else None


class _WeightOnlyLinear:
    """``y = x @ W^T + b`` with x, y float32 (other dtypes are converted). Subclasses set ``packed``
    (the kernels' layout, or None) and implement ``_fast`` and ``dequantized``."""

    out_features: int
    in_features: int
    bias: torch.Tensor | None
    nbytes: int  # bytes a call streams: packed weight and bias
    _fallback: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        fast = _kernels(x) if self.packed is not None else None
        y = self._fast(fast, x) if fast is not None else F.linear(x, self._float_weight(), self.bias)
        return y if dtype == torch.float32 else y.to(dtype)

    def _float_weight(self) -> torch.Tensor:
        if self._fallback is None:
            self._fallback = self.dequantized()
        return self._fallback

    def dequantized(self) -> torch.Tensor:  # [out, in] float32: the weight the layer multiplies by
        raise NotImplementedError

    def _fast(self, fast, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class BF16Linear(_WeightOnlyLinear):
    """bfloat16 weights. One row: the compiled kernel (float32 activations). More rows: oneDNN's bf16
    GEMM (activations rounded to bfloat16) where the CPU has AVX512-BF16/AMX, else the compiled kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape  # weight: [out, in]
        self.weight = weight.to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.float().contiguous()
        self.packed = pack_bf16(self.weight) if _kernels(self.weight) is not None else None
        self.onednn = pack_weight(self.weight)  # None unless the CPU has native bfloat16 GEMMs
        self.nbytes = self.weight.numel() * 2 + (0 if bias is None else bias.numel() * 4)
        if self.packed is not None:
            self.weight = None  # the packed copy is all the kernels need

    def dequantized(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight.float()
        w = self.packed.transpose(1, 2).float()  # [P, 16, K], panel element order
        w = w[:, torch.argsort(torch.tensor(_BF16_ORDER))].reshape(-1, self.in_features)
        return w[: self.out_features]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, in] float32 (embedding lookup)
        if self.weight is not None:
            return F.embedding(ids, self.weight).float()
        col = ids % BF16_PANEL
        element = torch.where(col < 8, 2 * col, 2 * (col - 8) + 1)  # inverse of _BF16_ORDER
        return self.packed[ids // BF16_PANEL, :, element].float()  # [T, K]

    def _fast(self, fast, x: torch.Tensor) -> torch.Tensor:
        if self.onednn is not None and x.shape[0] > 1:
            return packed_linear(x.to(torch.bfloat16), self.onednn, None).float() + \
                (0 if self.bias is None else self.bias)
        return fast.bf16_linear(x, self.packed, self.bias, self.out_features)


class IntLinear(_WeightOnlyLinear):
    """int8 or int4 group-wise weights (``QuantizedWeight``), packed for the compiled kernels."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = qw.shape
        self.bits = qw.bits
        self.bias = None if bias is None else bias.float().contiguous()
        self.packed = pack_int(qw)
        self.nbytes = self.packed.numel() + (0 if bias is None else bias.numel() * 4)

    def dequantized(self) -> torch.Tensor:
        return unpack_int(self.packed, self.bits, self.out_features).dequantize()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, in] float32 (embedding lookup)
        panels = unpack_int(self.packed[ids // INT_PANEL], self.bits, ids.numel() * INT_PANEL)  # 8 rows per id
        pick = torch.arange(ids.numel(), device=ids.device) * INT_PANEL + ids % INT_PANEL
        return panels.dequantize(pick)

    def _fast(self, fast, x: torch.Tensor) -> torch.Tensor:
        op = fast.int4_linear if self.bits == 4 else fast.int8_linear
        return op(x, self.packed, self.bias, self.out_features)


def unpack_int(packed: torch.Tensor, bits: int, n: int) -> QuantizedWeight:
    """Inverse of ``pack_int``."""
    p, g, _ = packed.shape
    meta = packed[..., -32:] if bits == 4 else packed[..., -16:]
    halves = meta.contiguous().view(torch.float16)  # [P, G, 8 or 16]
    scales = halves[..., :INT_PANEL].permute(0, 2, 1).reshape(p * INT_PANEL, g)[:n]
    if bits == 4:
        body = packed[..., :128].reshape(p, g, 4, INT_PANEL, 4)  # [P, G, j, c, kk]
        c = torch.stack([body & 15, body >> 4], dim=2)  # [P, G, half, j, c, kk]
        codes = c.permute(0, 4, 1, 2, 3, 5).reshape(p * INT_PANEL, g * GROUP)[:n]
        mins = halves[..., INT_PANEL:].permute(0, 2, 1).reshape(p * INT_PANEL, g)[:n]
        return QuantizedWeight(4, codes.contiguous(), scales.contiguous(), mins.contiguous())
    body = packed[..., :256].reshape(p, g, 8, INT_PANEL, 4).permute(0, 3, 1, 2, 4)  # [P, c, G, j, kk]
    codes = body.reshape(p * INT_PANEL, g * GROUP)[:n].contiguous().view(torch.int8)
    return QuantizedWeight(8, codes, scales.contiguous())

