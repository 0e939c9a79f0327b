"""Requests to simulate: Poisson arrivals with length distributions, or a replayed JSONL trace.

A trace line: ``{"arrival_time": 0.12, "prompt_len": 512, "output_len": 128}`` (seconds from the
start); ``request_id`` and ``temperature`` (default 1.0, as ``SamplingParams``) are optional.
Lengths are written ``256`` (fixed) or ``64-512`` (uniform, inclusive).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvtier.sim.errors import WorkloadError

TRACE_FIELDS = ("arrival_time", "prompt_len", "output_len")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    request_id: str
    arrival_time: float  # seconds from the start of the run
    prompt_len: int
    output_len: int  # tokens to generate (the engine runs it with max_tokens=output_len, ignore_eos)
    temperature: float = 1.0  # 0 is greedy (SamplingParams' default is 1.0)

    def __post_init__(self):
        assert self.arrival_time >= 0 and self.prompt_len >= 1 and self.output_len >= 1, self


@dataclass(frozen=True, slots=True)
class LengthDist:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int, what: str) -> LengthDist:
        parts = str(text).split("-")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            low, high = 0, -1
        if not 1 <= low <= high:
            raise WorkloadError(f"cannot read {what} '{text}'", "write a length like 256 or a range like 64-512")
        return cls(low, high)

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.integers(self.low, self.high + 1, size=n).tolist()


def poisson(rate: float, num_requests: int, prompt_len: str | int, output_len: str | int,
            seed: int = 0, temperature: float = 1.0) -> list[RequestSpec]:
    """``num_requests`` arrivals with exponential gaps of mean 1/rate (rate=inf: all at time 0); the first
    arrives at 0. One seed gives the same lengths at every rate."""
    if not rate > 0:
        raise WorkloadError(f"request rate must be > 0, got {rate}", "use requests per second, or inf for all at once")
    if num_requests < 1:
        raise WorkloadError(f"num_requests must be >= 1, got {num_requests}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, num_requests) / rate  # same lengths at every rate for one seed
    arrivals = np.cumsum(gaps) - gaps[0]
    prompts = LengthDist.parse(prompt_len, "prompt length").sample(rng, num_requests)
    outputs = LengthDist.parse(output_len, "output length").sample(rng, num_requests)
    return [RequestSpec(str(i), float(a), p, o, temperature)
            for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))]


def load_trace(path: str | Path) -> list[RequestSpec]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise WorkloadError(f"cannot read trace {path}: {e.strerror}", "give a JSONL file") from e
    specs = [_trace_line(line, i, path) for i, line in enumerate(lines, 1) if line.strip()]
    if not specs:
        raise WorkloadError(f"trace {path} has no requests", f"write one JSON object per line with {TRACE_FIELDS}")
    return sorted(specs, key=lambda r: r.arrival_time)


def _trace_line(line: str, number: int, path: Path) -> RequestSpec:
    where = f"trace {path} line {number}"
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise WorkloadError(f"{where}: not valid JSON ({e})", "one JSON object per line") from e
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object", f"fields: {', '.join(TRACE_FIELDS)}")
    for name in TRACE_FIELDS:
        if name not in obj:
            raise WorkloadError(f"{where}: field {name} is missing", f"fields: {', '.join(TRACE_FIELDS)}")
    t, p, o = obj["arrival_time"], obj["prompt_len"], obj["output_len"]
    if not (isinstance(t, (int, float)) and t >= 0):
        raise WorkloadError(f"{where}: field arrival_time must be a number >= 0, got {t!r}")
    for name, v in (("prompt_len", p), ("output_len", o)):
        if not (isinstance(v, int) and v >= 1):
            raise WorkloadError(f"{where}: field {name} must be an integer >= 1, got {v!r}")
    temp = obj.get("temperature", 1.0)
    if not (isinstance(temp, (int, float)) and 0 <= temp <= 100):
        raise WorkloadError(f"{where}: field temperature must be a number in [0, 100], got {temp!r}")
    return RequestSpec(str(obj.get("request_id", number - 1)), float(t), p, o, float(temp))


def save_trace(specs: list[RequestSpec], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(s)) + "\n" for s in specs))
