"""Hardware descriptions: load a preset or a file, validate it against the schema, turn it into
small dataclasses in base units (bytes, bytes/s, FLOP/s, seconds), join a device with a host.

Names are roles: the processor ``device`` runs the model and reads the memory tier ``device``; a
host adds the processor ``cpu`` and the tier ``host``; links join tiers (``pcie``: host <-> device).
On a CPU-only machine the model runs on the CPU, so ``kvtier profile`` writes its DRAM as ``device``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvtier.sim.errors import HardwareError
from kvtier.sim.schema import DTYPES, EFFICIENCIES, HARDWARE_SCHEMA, OVERHEADS, SAMPLING
from kvtier.sim.units import parse_quantity
from kvtier.utils.paths import cache_dir

PRESET_DIR = Path(__file__).resolve().parent / "presets"
LOCAL = "local"  # the file `kvtier profile` writes for this machine


def local_path() -> Path:
    return cache_dir("hardware") / f"{LOCAL}.yaml"


@dataclass(frozen=True, slots=True)
class MemoryTier:
    name: str
    capacity: float  # bytes
    read_bw: float  # bytes/s
    write_bw: float  # bytes/s


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    a: str
    b: str
    forward: float  # bytes/s a -> b
    backward: float  # bytes/s b -> a
    both: float | None = None  # bytes/s of both directions together when both run (None: full duplex)
    latency: float = 0.0  # seconds per transfer

    def joins(self, src: str, dst: str) -> bool:
        return {src, dst} == {self.a, self.b}

    def rate(self, src: str, dst: str) -> float:
        assert self.joins(src, dst), (self.name, src, dst)
        return self.forward if src == self.a else self.backward

    def stream(self, src: str, dst: str) -> str:
        return f"{self.name}:{src}>{dst}"


@dataclass(frozen=True, slots=True)
class MatmulCurve:
    """Measured matmul throughput at several row counts, for weights of one shape [out, in] streamed
    from memory (a ring of copies larger than the last-level cache)."""

    rows: tuple[int, ...]
    unit_s: tuple[float, ...]  # seconds per weight element at each row count, made non-decreasing
    shape: tuple[int, int] = (2048, 2048)

    @classmethod
    def from_flops(cls, rows: list[int], flops: list[float], shape=(2048, 2048)) -> MatmulCurve:
        assert len(rows) == len(flops) and rows == sorted(set(rows)) and min(flops) > 0
        unit, worst = [], 0.0
        for r, f in zip(rows, flops, strict=True):
            worst = max(worst, 2 * r / f)  # more rows never take less time
            unit.append(worst)
        return cls(tuple(rows), tuple(unit), tuple(shape))

    def distance(self, out_features: int, in_features: int) -> float:
        return abs(math.log(out_features / self.shape[0])) + abs(math.log(in_features / self.shape[1]))

    @property
    def best_flops(self) -> float:
        return 2 * self.rows[-1] / self.unit_s[-1]

    def seconds(self, rows: int, weight_elems: float) -> float:
        rs, us = self.rows, self.unit_s
        if rows <= rs[0]:
            return us[0] * weight_elems
        if rows >= rs[-1]:
            return us[-1] * rows / rs[-1] * weight_elems
        i = next(j for j in range(1, len(rs)) if rows <= rs[j])
        w = (rows - rs[i - 1]) / (rs[i] - rs[i - 1])
        return (us[i - 1] + w * (us[i] - us[i - 1])) * weight_elems


@dataclass(frozen=True, slots=True)
class LengthCurve:
    """Measured causal prefill attention throughput by chunk length (interpolated in log length)."""

    lengths: tuple[int, ...]
    flops: tuple[float, ...]

    def rate(self, n: int) -> float:
        ls, fs = self.lengths, self.flops
        if n <= ls[0]:
            return fs[0]
        if n >= ls[-1]:
            return fs[-1]
        i = next(j for j in range(1, len(ls)) if n <= ls[j])
        w = math.log(n / ls[i - 1]) / math.log(ls[i] / ls[i - 1])
        return fs[i - 1] + w * (fs[i] - fs[i - 1])


@dataclass(frozen=True, slots=True)
class Processor:
    name: str
    kind: str
    memory: str  # the tier it reads at full speed
    peak_flops: dict[str, float]
    efficiency: dict[str, float]  # matmul, memory, attention_decode, attention_prefill (default 1)
    overheads: dict[str, float]  # op, step, sequence (seconds, default 0)
    cores: int | None = None
    l2_cache: float | None = None
    curves: dict[str, tuple[MatmulCurve, ...]] = field(default_factory=dict)  # per dtype, one per weight shape
    decode_bandwidth: float | None = None  # measured paged-decode-attention read rate, bytes/s
    decode_per_sequence: float = 0.0  # seconds per decode sequence per layer in that kernel
    decode_per_call: float = 0.0  # seconds per call (per layer) of that kernel beyond the op overhead
    prefill_curves: dict[str, LengthCurve] = field(default_factory=dict)  # measured causal prefill attention
    prefill_masked_flops: dict[str, float] = field(default_factory=dict)  # after a cached prefix, FLOP/s
    sampling: dict[str, float] = field(default_factory=dict)  # call: seconds; greedy, random: seconds per logit

    def dtypes(self) -> list[str]:
        return sorted(set(self.peak_flops) | set(self.curves))

    def curve(self, dtype: str, out_features: int, in_features: int) -> MatmulCurve | None:
        """The measured curve whose weight shape is nearest (in log scale) to ``[out, in]``."""
        curves = self.curves.get(dtype)
        return min(curves, key=lambda c: c.distance(out_features, in_features)) if curves else None


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    description: str
    processors: dict[str, Processor]
    memory: dict[str, MemoryTier]
    links: dict[str, Link]
    origins: tuple[str, ...] = ()

    def processor(self, name: str) -> Processor:
        if name not in self.processors:
            raise HardwareError(f"hardware {self.name} has no processor '{name}'",
                                f"it has: {', '.join(self.processors) or 'none'}")
        return self.processors[name]

    def tier(self, name: str) -> MemoryTier:
        if name not in self.memory:
            raise HardwareError(f"hardware {self.name} has no memory tier '{name}'",
                                f"it has: {', '.join(self.memory)}; add a host with --host for 'host'")
        return self.memory[name]

    def link(self, src: str, dst: str) -> Link:
        for link in self.links.values():
            if link.joins(src, dst):
                return link
        raise HardwareError(f"hardware {self.name} has no link between '{src}' and '{dst}'",
                            f"links: {', '.join(f'{k} ({v.a}<->{v.b})' for k, v in self.links.items()) or 'none'}")


# ---- finding and reading files -------------------------------------------------------------------

def preset_names(role: str | None = None) -> list[str]:
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    return [n for n in names if role is None or read_raw(n)[0].get("role") == role]


def read_raw(spec: str | Path) -> tuple[dict, str]:
    """The parsed file for a preset name or a path, and where it came from."""
    path = Path(spec).expanduser()
    if str(spec) == LOCAL:
        path = local_path()
        if not path.is_file():
            raise HardwareError(f"this machine has no hardware file yet ({path})",
                                f"run `kvtier profile` first, or use a preset: {', '.join(preset_names())}")
    if not path.is_file():
        if str(spec) in {p.stem for p in PRESET_DIR.glob("*.yaml")}:
            path = PRESET_DIR / f"{spec}.yaml"
        else:
            raise HardwareError(f"unknown hardware '{spec}' (not a preset, not a file)",
                                f"use '{LOCAL}' (written by kvtier profile), a .yaml/.json file or one of: "
                                f"{', '.join(preset_names())}")
    try:
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else _yaml_load(text)
    except (OSError, ValueError) as e:
        raise HardwareError(f"cannot read hardware file {path}: {str(e).splitlines()[0]}",
                            "it must be YAML or JSON following docs/simulator.md") from e
    if not isinstance(raw, dict):
        raise HardwareError(f"hardware file {path} is not a mapping", "see docs/simulator.md for the schema")
    return raw, str(path)


def _yaml_load(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from e


def validate_raw(raw: dict, origin: str) -> None:
    """Check a parsed file against the schema; the error names the field and the allowed values."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    err = best_match(Draft202012Validator(HARDWARE_SCHEMA).iter_errors(raw))
    if err is not None:
        raise HardwareError(f"hardware file {origin}: {_explain(err)}", "see docs/simulator.md for the schema")


def _explain(err) -> str:
    where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    v, schema = err.validator, err.schema
    if v == "additionalProperties":
        allowed = ", ".join(schema.get("properties", {})) or "none"
        extra = sorted(set(err.instance) - set(schema.get("properties", {})))
        return f"field {where}: unknown key(s) {', '.join(extra)}; allowed: {allowed}"
    if v == "propertyNames":
        names = schema["propertyNames"]
        allowed = ", ".join(names["enum"]) if "enum" in names else f"names matching {names['pattern']}"
        bad = [k for k in err.instance if k not in names.get("enum", [k])] or list(err.instance)
        return f"field {where}: key {bad[0]!r} is not allowed; allowed: {allowed}"
    if v == "enum":
        return f"field {where}: {err.instance!r} is not allowed; allowed: {', '.join(map(str, err.validator_value))}"
    if v == "required":
        return f"field {where}: {err.message.split(' is a required')[0]} is missing"
    if v == "const":
        return f"field {where}: must be {err.validator_value!r}, got {err.instance!r}"
    return f"field {where}: {err.message}"


# ---- raw dict -> dataclasses ----------------------------------------------------------------------

def _q(raw: dict | None, kind: str, where: str, default: float | None = None) -> float | None:
    if raw is None:
        return default
    try:
        x = parse_quantity(raw["value"], kind)
    except ValueError as e:
        raise HardwareError(f"field {where}: {e}", "write a number with one of the units listed") from e
    if x < 0 or (x == 0 and kind not in ("seconds", "ratio")):
        raise HardwareError(f"field {where}: {raw['value']!r} must be positive")
    return x


def _tier(name: str, raw: dict, origin: str) -> MemoryTier:
    w = f"{origin}: memory.{name}"
    read = _q(raw["read_bandwidth"], "bytes_per_s", f"{w}.read_bandwidth")
    return MemoryTier(name, _q(raw["capacity"], "bytes", f"{w}.capacity"), read,
                      _q(raw.get("write_bandwidth"), "bytes_per_s", f"{w}.write_bandwidth", read))


def _link(name: str, raw: dict, origin: str) -> Link:
    w = f"{origin}: links.{name}"
    a, b = raw["ends"]
    if a == b:
        raise HardwareError(f"field {w}.ends: a link joins two different tiers, got [{a}, {b}]")
    return Link(name, a, b, _q(raw["forward"], "bytes_per_s", f"{w}.forward"),
                _q(raw["backward"], "bytes_per_s", f"{w}.backward"),
                _q(raw.get("both_directions"), "bytes_per_s", f"{w}.both_directions"),
                _q(raw.get("latency"), "seconds", f"{w}.latency", 0.0))


def _curve(raw: dict, where: str) -> MatmulCurve:
    rows, flops = raw["rows"], raw["flops"]
    if len(rows) != len(flops) or rows != sorted(set(rows)):
        raise HardwareError(f"field {where}: rows must be increasing and as many as flops "
                            f"(got {len(rows)} rows, {len(flops)} flops)")
    return MatmulCurve.from_flops(rows, [_q({"value": f}, "flops", f"{where}.flops") for f in flops], raw["shape"])


def _length_curve(raw: dict, where: str) -> LengthCurve:
    lengths, flops = raw["lengths"], raw["flops"]
    if len(lengths) != len(flops) or lengths != sorted(set(lengths)):
        raise HardwareError(f"field {where}: lengths must be increasing and as many as flops "
                            f"(got {len(lengths)} lengths, {len(flops)} flops)")
    return LengthCurve(tuple(lengths), tuple(_q({"value": f}, "flops", f"{where}.flops") for f in flops))


def _processor(name: str, raw: dict, origin: str) -> Processor:
    w = f"{origin}: processors.{name}"
    eff = {k: _q(raw.get("efficiency", {}).get(k), "ratio", f"{w}.efficiency.{k}", 1.0) for k in EFFICIENCIES}
    for k, x in eff.items():
        if not 0 < x <= 1:
            raise HardwareError(f"field {w}.efficiency.{k}: {x} is outside (0, 1]", "write a fraction such as 0.8")
    attn = raw.get("attention", {})
    cores = _q(raw.get("cores"), "count", f"{w}.cores")
    return Processor(
        name, raw["kind"], raw["memory"],
        {d: _q(q, "flops", f"{w}.peak_flops.{d}") for d, q in raw.get("peak_flops", {}).items()},
        eff,
        {k: _q(raw.get("overheads", {}).get(k), "seconds", f"{w}.overheads.{k}", 0.0) for k in OVERHEADS},
        cores=None if cores is None else int(cores),
        l2_cache=_q(raw.get("l2_cache"), "bytes", f"{w}.l2_cache"),
        curves={d: tuple(_curve(c, f"{w}.matmul_curves.{d}[{i}]") for i, c in enumerate(cs))
                for d, cs in raw.get("matmul_curves", {}).items()},
        decode_bandwidth=_q(attn.get("decode_bandwidth"), "bytes_per_s", f"{w}.attention.decode_bandwidth"),
        decode_per_sequence=_q(attn.get("decode_per_sequence"), "seconds", f"{w}.attention.decode_per_sequence",
                               0.0),
        decode_per_call=_q(attn.get("decode_per_call"), "seconds", f"{w}.attention.decode_per_call", 0.0),
        prefill_curves={d: _length_curve(c, f"{w}.attention.prefill_curves.{d}")
                        for d, c in attn.get("prefill_curves", {}).items()},
        prefill_masked_flops={d: _q(q, "flops", f"{w}.attention.prefill_masked_flops.{d}")
                              for d, q in attn.get("prefill_masked_flops", {}).items()},
        sampling={k: _q(q, "seconds", f"{w}.sampling.{k}") for k, q in raw.get("sampling", {}).items()
                  if k in SAMPLING},
    )


def from_raw(raw: dict, origin: str) -> Hardware:
    validate_raw(raw, origin)
    return Hardware(
        raw["name"], raw.get("description", ""),
        {n: _processor(n, p, origin) for n, p in raw.get("processors", {}).items()},
        {n: _tier(n, t, origin) for n, t in raw.get("memory", {}).items()},
        {n: _link(n, lk, origin) for n, lk in raw.get("links", {}).items()},
        (origin,),
    )


# ---- whole systems --------------------------------------------------------------------------------

def load_hardware(spec: str | Path) -> Hardware:
    """One preset or file, validated (not yet checked as a system)."""
    raw, origin = read_raw(spec)
    return from_raw(raw, origin)


def merge(device: Hardware, host: Hardware) -> Hardware:
    """A device file joined with a host file; a name defined in both is an error."""
    for part in ("processors", "memory", "links"):
        both = set(getattr(device, part)) & set(getattr(host, part))
        if both:
            raise HardwareError(f"{part} {', '.join(sorted(both))} defined in both {device.name} and {host.name}",
                                "drop --host (the device file already describes its host) or use another host")
    return Hardware(f"{device.name}+{host.name}", f"{device.description} | {host.description}",
                    {**device.processors, **host.processors}, {**device.memory, **host.memory},
                    {**device.links, **host.links}, device.origins + host.origins)


def check_system(hw: Hardware) -> Hardware:
    """A system the simulator can run: a ``device`` processor on an existing tier. Links whose ends
    are missing (a device file's PCIe link without a host) are dropped."""
    if "device" not in hw.processors:
        raise HardwareError(f"hardware {hw.name} has no 'device' processor to run the model",
                            "give a device or machine file (--hardware), not only a host")
    for p in hw.processors.values():
        hw.tier(p.memory)
    dev = hw.processors["device"]
    if not dev.peak_flops and not dev.curves:
        raise HardwareError(f"processor device of {hw.name} has neither peak_flops nor matmul_curves",
                            f"add peak_flops for one of: {', '.join(DTYPES)}")
    links = {n: lk for n, lk in hw.links.items() if lk.a in hw.memory and lk.b in hw.memory}
    return replace(hw, links=links)


def load_system(device: str | Path, host: str | Path | None = None) -> Hardware:
    hw = load_hardware(device)
    if host is not None:
        hw = merge(hw, load_hardware(host))
    return check_system(hw)


def unsourced_numbers(raw, path: str = "") -> list[str]:
    """Paths of numbers in a parsed file that no ``source`` covers (``schema_version`` aside)."""
    if isinstance(raw, dict):
        if "source" in raw:
            return []
        return [p for k, v in raw.items() if k != "schema_version" for p in unsourced_numbers(v, f"{path}.{k}")]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in unsourced_numbers(v, f"{path}[{i}]")]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return [path.lstrip(".")]
    return []
