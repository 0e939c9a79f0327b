"""Server metrics in the Prometheus text format (vLLM's names under the ``kvtier:`` prefix).

The engine thread records (``on_step``, ``on_idle``, ``on_abort``); the HTTP side counts errors and
renders. One lock guards both sides, so a scrape sees one consistent snapshot.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from kvtier.engine.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
PREFIX = "kvtier:"


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        assert list(self.buckets) == sorted(self.buckets)
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, x: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if x <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += x
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.total!r}", f"{name}_count {self.count}"]


@dataclass(slots=True)
class Gauges:
    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    kv: dict[str, dict] = field(default_factory=dict)  # tier -> engine.kv_usage() entry


class ServerMetrics:
    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.window_s = window_s
        self.gauges = Gauges()
        self.ttft, self.tpot, self.e2e = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS), Histogram(E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}  # finish reason -> completions
        self.aborted = 0
        self.http_errors: dict[int, int] = {}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated in that step)
        self._seen: dict[str, int] = {}  # request id -> output tokens counted so far

    # ---- engine thread ------------------------------------------------------------------------
    def on_step(self, engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        with self.lock:
            new = sum(self._count(out) for out in outputs)
            self.generation_tokens += new
            self._recent.append((now, new))
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            self._read_gauges(engine)

    def on_idle(self, engine) -> None:
        with self.lock:
            self._read_gauges(engine)

    def on_abort(self, request_id: str) -> None:
        with self.lock:
            self.aborted += 1
            self._seen.pop(request_id, None)

    def _count(self, out: RequestOutput) -> int:
        """New output tokens of one request; at its end, its latencies go into the histograms."""
        if out.request_id not in self._seen:
            self.prompt_tokens += len(out.prompt_token_ids)
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - self._seen.get(out.request_id, 0)
        self._seen[out.request_id] = total
        if out.finished:
            del self._seen[out.request_id]
            for c, st in zip(out.outputs, out.stats, strict=True):
                self.finished[c.finish_reason] = self.finished.get(c.finish_reason, 0) + 1
                for hist, value in ((self.ttft, st.ttft_s), (self.tpot, st.tpot_s), (self.e2e, st.e2e_s)):
                    if value is not None:
                        hist.observe(value)
        return new

    def _read_gauges(self, engine) -> None:
        sched = engine.scheduler
        self.gauges = Gauges(len(sched.running), len(sched.waiting), sched.num_preemptions, engine.kv_usage())

    # ---- HTTP side ----------------------------------------------------------------------------
    def on_http_error(self, status: int) -> None:
        with self.lock:
            self.http_errors[status] = self.http_errors.get(status, 0) + 1

    def tokens_per_second(self) -> float:
        if not self._recent:
            return 0.0
        span = max(time.monotonic() - self._recent[0][0], 1e-3)
        return sum(n for _, n in self._recent) / span

    def render(self) -> str:
        with self.lock:
            lines = self._gauge_lines() + self._counter_lines() + self._histogram_lines()
        return "\n".join(lines) + "\n"

    def _gauge_lines(self) -> list[str]:
        g = self.gauges
        out = _metric("num_requests_running", "gauge", "sequences in the running batch", [("", g.running)])
        out += _metric("num_requests_waiting", "gauge", "sequences waiting to be scheduled", [("", g.waiting)])
        for key, what in (("blocks_used", "used"), ("blocks_total", "total")):
            out += _metric(f"kv_{key}", "gauge", f"KV blocks {what}, per memory tier",
                           [(f'{{tier="{t}"}}', u[key]) for t, u in g.kv.items()])
        out += _metric("kv_cache_usage_perc", "gauge", "fraction of KV blocks in use, per memory tier",
                       [(f'{{tier="{t}"}}', u["blocks_used"] / u["blocks_total"]) for t, u in g.kv.items()])
        out += _metric("generation_tokens_per_second", "gauge", f"output tokens/s over the last {self.window_s:g} s",
                       [("", round(self.tokens_per_second(), 3))])
        rss = _resident_bytes()
        if rss is not None:
            out += _metric("resident_memory_bytes", "gauge", "resident memory of the server process", [("", rss)],
                           prefix="process_")
        return out

    def _counter_lines(self) -> list[str]:
        out = _metric("num_preemptions_total", "counter", "preemptions (recomputed later)",
                      [("", self.gauges.preemptions)])
        out += _metric("prompt_tokens_total", "counter", "prompt tokens of admitted requests",
                       [("", self.prompt_tokens)])
        out += _metric("generation_tokens_total", "counter", "output tokens generated",
                       [("", self.generation_tokens)])
        out += _metric("request_success_total", "counter", "completions finished, by finish reason",
                       [(f'{{finished_reason="{r}"}}', n) for r, n in sorted(self.finished.items())])
        out += _metric("request_aborted_total", "counter", "requests cancelled (client gone)", [("", self.aborted)])
        out += _metric("http_errors_total", "counter", "error responses, by status",
                       [(f'{{status="{s}"}}', n) for s, n in sorted(self.http_errors.items())])
        return out

    def _histogram_lines(self) -> list[str]:
        out = []
        for name, hist, what in (("time_to_first_token_seconds", self.ttft, "time to first token"),
                                 ("time_per_output_token_seconds", self.tpot, "mean time per output token"),
                                 ("e2e_request_latency_seconds", self.e2e, "arrival to finish")):
            out += [f"# HELP {PREFIX}{name} {what}", f"# TYPE {PREFIX}{name} histogram"]
            out += hist.lines(PREFIX + name)
        return out


def _metric(name: str, kind: str, help: str, samples: list[tuple[str, float]], prefix: str = PREFIX) -> list[str]:
    full = prefix + name
    return [f"# HELP {full} {help}", f"# TYPE {full} {kind}"] + [f"{full}{labels} {value}" for labels, value in samples]


def _resident_bytes() -> int | None:
    """Current resident set size (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def parse_samples(text: str) -> dict[str, float]:
    """Exposition text -> {'name{labels}': value} (for tests and the load generator)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
