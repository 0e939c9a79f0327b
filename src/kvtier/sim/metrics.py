"""Serving metrics from per-request timestamps: the same code scores the engine and the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    arrival: float  # seconds, on the run's clock
    prompt_len: int
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled
    finished: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None

    @property
    def itls(self) -> list[float]:
        return np.diff(self.token_times).tolist() if len(self.token_times) >= 2 else []

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


def latency_stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: list[RequestRecord]) -> dict:
    """Throughput over the span from the first arrival to the last finish, and latency statistics."""
    done = [r for r in records if r.finished is not None]
    assert done, "no request finished"
    span = max(r.finished for r in done) - min(r.arrival for r in records)
    out_tokens = sum(len(r.token_times) for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    return {
        "num_requests": len(records),
        "num_finished": len(done),
        "duration_s": span,
        "request_throughput": len(done) / span if span else None,
        "output_throughput": out_tokens / span if span else None,
        "total_token_throughput": (in_tokens + out_tokens) / span if span else None,
        "ttft_s": latency_stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": latency_stats([r.tpot for r in done if r.tpot is not None]),
        "itl_s": latency_stats([x for r in done for x in r.itls]),
        "e2e_s": latency_stats([r.e2e for r in done]),
        "num_preemptions": sum(r.num_preemptions for r in records),
    }
