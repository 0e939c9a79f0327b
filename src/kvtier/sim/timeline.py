"""A step as a timeline of streams: each op runs on one stream (the device's compute, one direction
of a link, the host CPU) after the previous op of its stream and after the ops it depends on. The
step takes the critical path (the last end), not a sum and not a global discount.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(slots=True)
class Span:
    name: str
    stream: str
    start: float
    end: float
    layer: int | None = None


@dataclass(slots=True)
class Timeline:
    record: bool = False  # keep every span (for reports and plots), not only the totals
    free: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # stream -> when it is free
    busy: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # stream -> seconds working
    stall: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # stream -> seconds waiting
    by_name: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # op kind -> seconds
    num_ops: int = 0
    spans: list[Span] = field(default_factory=list)

    def add(self, stream: str, seconds: float, name: str, after: float = 0.0, layer: int | None = None) -> float:
        """Run ``seconds`` of work on ``stream`` once it is free and ``after`` has passed; return its end."""
        assert seconds >= 0.0, (name, seconds)
        ready = self.free[stream]
        start = max(ready, after)
        if start > ready and self.num_ops:
            self.stall[stream] += start - ready
        end = start + seconds
        self.free[stream] = end
        self.busy[stream] += seconds
        self.by_name[name] += seconds
        self.num_ops += 1
        if self.record:
            self.spans.append(Span(name, stream, start, end, layer))
        return end

    @property
    def makespan(self) -> float:
        return max(self.free.values(), default=0.0)

    def summary(self) -> dict:
        total = self.makespan
        return {
            "seconds": total,
            "num_ops": self.num_ops,
            "streams": {s: {"busy_s": b, "stall_s": self.stall.get(s, 0.0), "utilization": b / total if total else 0.0}
                        for s, b in sorted(self.busy.items())},
            "ops": dict(sorted(self.by_name.items(), key=lambda kv: -kv[1])),
        }


def shared_link_seconds(b1: float, r1: float, b2: float, r2: float, both: float | None) -> tuple[float, float]:
    """Durations of two transfers that start together in opposite directions of one link.

    Each direction has its own rate (r1, r2 bytes/s); while both run, their rates are scaled down in
    proportion so they sum to ``both`` (None: full duplex, no contention); the one left alone goes
    back to full speed.
    """
    assert b1 >= 0 and b2 >= 0 and r1 > 0 and r2 > 0
    if both is None or b1 == 0 or b2 == 0 or r1 + r2 <= both:
        return b1 / r1, b2 / r2
    scale = both / (r1 + r2)
    a1, a2 = r1 * scale, r2 * scale
    t1, t2 = b1 / a1, b2 / a2
    if t1 <= t2:
        return t1, t1 + (b2 - a2 * t1) / r2
    return t2 + (b1 - a1 * t2) / r1, t2
