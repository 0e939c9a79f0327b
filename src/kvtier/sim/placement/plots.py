"""Plots of placement sweeps: throughput over static and over the LP bound, per policy."""

from __future__ import annotations

from pathlib import Path

from kvtier.sim.plots import _pyplot, save_figure, style_axes

LABELS = {"sparsity": "sparsity (share of the KV a step does not read)",
          "variation": "importance variation (share redrawn per 10 decode steps)",
          "capacity": "HBM for KV (GB)"}


def plot_sweep(rows: list[dict], kind: str, path: str | Path, title: str) -> Path:
    plt = _pyplot()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    scale = 1e-9 if kind == "capacity" else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in ((axes[0], "vs_static", "throughput / static"),
                           (axes[1], "of_lp", "throughput / LP bound")):
        for name in policies:
            pts = [(r["value"] * scale, r[key]) for r in rows if r["policy"] == name and r[key] is not None]
            if pts:
                style = "--" if name in ("unlimited", "lp") else "-"
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", label=name)
        style_axes(ax, LABELS[kind], label)
    return save_figure(plt, fig, path, title)
