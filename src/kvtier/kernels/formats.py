"""KV cache formats and their exact memory cost.

A format says how one layer's K and V are stored; :func:`kv_bytes` reports, from first principles
(not from allocated tensors, which ``tests/test_formats.py`` checks it against), the bytes per
block of every part of it:

- plain ``float32`` / ``bfloat16`` / ``float16``: K and V values, nothing else;
- HACK (``hack2`` / ``hack4`` / ``hack8``, :class:`HackFormat`): packed codes, a 16-bit scale and a
  16-bit minimum per partition, the int16 code sum per partition, and per *sequence* the 16-bit
  tail holding V of its open (partial) block until it fills (reported apart, and amortized over
  the context by :meth:`KVBytes.amortized_per_token`).

The HACK cache (``kernels/hack.py``), one layer, ``P = D / pi``, ``R = pi * bits / 8`` bytes per packed
row of ``pi`` codes: per (block, KV head) one slab of

    codes: K P * pi * R, V D * R          scales, minima (float16): K P * pi, V D each
    sums (int16): K P * pi, V D

and per sequence slot a 16-bit tail of ``pi * D`` V values (per KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.errors import ConfigError

FLOAT_FORMATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HACK_FORMATS = ("hack2", "hack4", "hack8")  # HACK codes of 2, 4 or 8 bits, partitions of 64
META_DTYPE = torch.float16  # HACK scales and minima
SUM_DTYPE = torch.int16  # HACK per-partition code sums: pi * (2**bits - 1) <= 128 * 255 < 2**15


@dataclass(frozen=True, slots=True)
class HackFormat:
    """HACK (arXiv 2502.03589): asymmetric min-max codes of ``bits`` bits per partition of ``pi``."""

    bits: int = 2
    pi: int = 64  # partition size; also the block size of a HACK cache (one V partition = one block)
    tail_dtype: torch.dtype = torch.float16  # V of each sequence's open block

    def __post_init__(self):
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"HACK codes of {self.bits} bits are not supported", "use 2, 4 or 8 bits")
        if self.pi not in (16, 32, 64, 128):
            raise ConfigError(f"HACK partition size {self.pi} is not supported", "use 16, 32, 64 or 128 (default 64)")
        if self.tail_dtype not in (torch.float16, torch.bfloat16):
            raise ConfigError(f"HACK tail dtype {self.tail_dtype} is not 16-bit", "use torch.float16 or bfloat16")

    @property
    def name(self) -> str:
        return f"hack{self.bits}" if self.pi == 64 else f"hack{self.bits}-pi{self.pi}"

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed row of ``pi`` codes."""
        return self.pi * self.bits // 8

    def check_head_dim(self, head_dim: int) -> int:
        """Partitions per head along head_dim (K is partitioned along it)."""
        if head_dim % self.pi:
            raise ConfigError(f"head_dim {head_dim} is not a multiple of the HACK partition size {self.pi}",
                              f"choose pi among the divisors of {head_dim} (16, 32, 64 or 128)")
        return head_dim // self.pi


@dataclass(frozen=True, slots=True)
class KVBytes:
    """Exact bytes of one layer's KV cache (all KV heads, K and V) in one format."""

    format: str
    block_tokens: int  # tokens per block
    codes: int  # per block: K and V values (float formats) or packed codes (HACK)
    scales: int  # per block
    minima: int  # per block
    sums: int  # per block: per-partition code sums
    tail_per_sequence: int  # per sequence: 16-bit V of the open block (HACK), 0 for float formats

    @property
    def block(self) -> int:
        return self.codes + self.scales + self.minima + self.sums

    @property
    def per_token(self) -> float:
        """Bytes per cached token, without the per-sequence tail."""
        return self.block / self.block_tokens

    def amortized_per_token(self, context_len: int) -> float:
        """Bytes per token of a sequence of ``context_len`` tokens, its tail spread over them."""
        assert context_len > 0
        return self.per_token + self.tail_per_sequence / context_len

    def sequence_bytes(self, context_len: int) -> int:
        """Bytes allocated to one sequence: whole blocks and its tail."""
        return -(-context_len // self.block_tokens) * self.block + self.tail_per_sequence


def parse_format(name: str | HackFormat) -> str | HackFormat:
    """``float32`` / ``bfloat16`` / ``float16`` / ``hack2`` / ``hack4`` / ``hack8`` or a HackFormat."""
    if isinstance(name, HackFormat) or name in FLOAT_FORMATS:
        return name
    if name in HACK_FORMATS:
        return HackFormat(bits=int(name[-1]))
    names = ", ".join([*FLOAT_FORMATS, *HACK_FORMATS])
    raise ConfigError(f"unknown KV format '{name}'", f"use one of: {names}")


def kv_bytes(fmt: str | HackFormat, num_kv_heads: int, head_dim: int, block_size: int = 16) -> KVBytes:
    """Bytes per block and per sequence of one layer; ``block_size`` applies to float formats only."""
    fmt = parse_format(fmt)
    if isinstance(fmt, HackFormat):
        return _hack_bytes(fmt, num_kv_heads, head_dim)
    itemsize = FLOAT_FORMATS[fmt].itemsize
    return KVBytes(fmt, block_size, 2 * num_kv_heads * block_size * head_dim * itemsize, 0, 0, 0, 0)


def _hack_bytes(fmt: HackFormat, hkv: int, d: int) -> KVBytes:
    parts = fmt.check_head_dim(d)
    meta, sums = META_DTYPE.itemsize, SUM_DTYPE.itemsize
    k_codes = hkv * parts * fmt.pi * fmt.row_bytes  # per partition: pi tokens x pi codes
    v_codes = hkv * d * fmt.row_bytes  # d channels x pi tokens
    k_groups, v_groups = hkv * parts * fmt.pi, hkv * d  # (scale, min, sum) triples per block
    return KVBytes(
        format=fmt.name,
        block_tokens=fmt.pi,
        codes=k_codes + v_codes,
        scales=(k_groups + v_groups) * meta,
        minima=(k_groups + v_groups) * meta,
        sums=(k_groups + v_groups) * sums,
        tail_per_sequence=hkv * fmt.pi * d * fmt.tail_dtype.itemsize,
    )
