"""Plots (matplotlib, PNG) for sweeps and step timelines."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style_axes(ax, xlabel: str, ylabel: str) -> None:
    """Labels, a light grid and a small legend: the look of every line plot here."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(plt, fig, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_rate_sweep(rows: list[dict], path: str | Path, title: str) -> Path:
    """Throughput and latencies against the request rate (one point per simulated run, one line per KV
    policy and statistic)."""
    plt = _pyplot()
    policies = list(dict.fromkeys(r.get("policy", "") for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [("output tokens/s", [("output", lambda r: r["output_throughput"])]),
              ("TTFT (s)", [("mean", lambda r: r["ttft_s"]["mean"]), ("p99", lambda r: r["ttft_s"]["p99"])]),
              ("TPOT (ms)", [("mean", lambda r: 1e3 * r["tpot_s"]["mean"]),
                             ("p99", lambda r: 1e3 * r["tpot_s"]["p99"])]),
              ("end-to-end (s)", [("p50", lambda r: r["e2e_s"]["p50"]), ("p99", lambda r: r["e2e_s"]["p99"])])]
    for ax, (label, series) in zip(axes.flat, panels, strict=True):
        for policy in policies:
            mine = [r for r in rows if r.get("policy", "") == policy]
            for name, fn in series:
                ax.plot([r["rate"] for r in mine], [fn(r) for r in mine], marker="o",
                        label=f"{policy} {name}".strip() if len(policies) > 1 else name)
        style_axes(ax, "request rate (req/s)", label)
    return save_figure(plt, fig, path, title)


def plot_context_sweep(points: list[dict], path: str | Path, title: str) -> Path:
    """Step time against context length, one line per batch size (points: batch, context, seconds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for b in sorted({p["batch"] for p in points}):
        pts = sorted((p["context"], p["seconds"]) for p in points if p["batch"] == b)
        ax.plot([c for c, _ in pts], [1e3 * s for _, s in pts], marker="o", label=f"batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel("decode step time (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_timeline(spans: list, path: str | Path, title: str, max_layers: int = 4) -> Path:
    """A Gantt chart of one step's streams (the first ``max_layers`` layers, to stay readable)."""
    plt = _pyplot()
    limit = max((s.end for s in spans if s.layer is not None and s.layer < max_layers), default=float("inf"))
    shown = [s for s in spans if (s.start <= limit) if s.layer is None or s.layer < max_layers]
    streams = sorted({s.stream for s in shown}, key=lambda x: (x != "host", x != "device", x))
    names = sorted({s.name for s in shown})
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.6 * len(streams)))
    for y, stream in enumerate(streams):
        for s in (s for s in shown if s.stream == stream):
            ax.broken_barh([(s.start * 1e3, (s.end - s.start) * 1e3)], (y - 0.35, 0.7), color=colors[s.name])
    ax.set_yticks(range(len(streams)), streams)
    ax.set_xlabel(f"time (ms), layers 0-{max_layers - 1}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    ax.legend(handles, names, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
