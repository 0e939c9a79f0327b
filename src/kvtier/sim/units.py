"""Quantities as hardware files write them: "3.35 TB/s", "80 GiB", "989 TFLOP/s", "2 us", "0.7".

Each kind of quantity has its own units; a bare number is in the base unit (bytes, bytes/s,
FLOP/s, seconds, a plain ratio or count).
"""

from __future__ import annotations

import re

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BIN = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}


def _prefixed(base: str) -> dict[str, float]:
    units = {p + base: f for p, f in _SI.items()}
    units.update({p + base: f for p, f in _BIN.items()})
    return units


UNITS: dict[str, dict[str, float]] = {
    "bytes": _prefixed("B"),
    "bytes_per_s": _prefixed("B/s"),
    "flops": {**_prefixed("FLOP/s"), **_prefixed("OP/s")},
    "seconds": {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9},
    "ratio": {"": 1.0, "%": 0.01},
    "count": {"": 1.0},
}
_NUMBER = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z%/]*)\s*")


def parse_quantity(value: str | int | float, kind: str) -> float:
    """The value in base units; ValueError naming the allowed units when it cannot be read."""
    assert kind in UNITS, kind
    if isinstance(value, bool):
        raise ValueError(f"expected a {kind.replace('_', ' ')} value, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    m = _NUMBER.fullmatch(str(value))
    units = UNITS[kind]
    if not m or m.group(2) not in units:
        shown = ", ".join(u for u in units if u) or "a plain number"
        raise ValueError(f"cannot read {value!r} as {kind.replace('_', ' ')}; units: {shown}")
    return float(m.group(1)) * units[m.group(2)]


def format_rate(x: float, unit: str = "B/s") -> str:
    for prefix, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_seconds(s: float) -> str:
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"
