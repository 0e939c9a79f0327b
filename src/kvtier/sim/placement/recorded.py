"""Traces recorded by kvtier (``kvtier generate --trace FILE``, format in ``kvtier.kv.trace``), scaled
to the study's model shape and workload.

The mapping from a recorded run (a small model, a few thousand tokens, a few hundred decode steps)
to the study's (e.g. Llama-3.1-8B, 30K prompt + 10K decode):

- heads: a unit holds every KV head of its layers, so a layer's mass is the mean over its KV heads;
- layers: by relative depth, source layer ``s`` of ``Ls`` feeds layer group ``floor(s * G / Ls)``
  (the groups' mean);
- positions: by relative position in the context. Each recorded step gives, per layer, the cumulative
  attention over ``position / context``; a target unit gets the increase of that curve over its own
  span of the target context (linear within a recorded block). Sinks stay at the start, recent
  tokens at the end; a hot recorded block widens with the context ratio;
- steps: by relative time. Target decode step ``j`` of ``D`` reads recorded decode step
  ``floor(j * S / D)`` of ``S``; a simulated step takes the mean of the recorded steps it spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.errors import KvtierError
from kvtier.kv.trace import read_trace
from kvtier.sim.errors import WorkloadError
from kvtier.sim.placement.traces import AccessTrace, Grid, normalized

RECORD_HINT = "record one with: kvtier generate PROMPT --max-tokens 512 --ignore-eos --trace FILE"


@dataclass(frozen=True)
class Recording:
    """One sequence of a recorded trace, at the recorded resolution, KV heads averaged."""

    path: str
    model: str
    num_layers: int
    block_size: int
    context: np.ndarray  # [S] tokens attended at each recorded decode step
    mass: list  # S arrays [num_layers, blocks_i] float32, each row sums to 1

    @property
    def num_steps(self) -> int:
        return len(self.context)


def _step_mass(mass: np.ndarray) -> np.ndarray:
    """[L, H, nb] per-head mass -> [L, nb] per-layer share (heads averaged, rows sum to 1)."""
    m = mass.mean(axis=1)
    total = m.sum(axis=1, keepdims=True)
    return (m / np.where(total > 0, total, 1.0)).astype(np.float32)


def load_recording(path: str | Path) -> Recording:
    """The first sequence of a kvtier attention trace (the one decoding in the first recorded step)."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"trace file {p} not found", RECORD_HINT)
    try:
        header, steps = read_trace(p)
        context, mass, seq = [], [], None
        for _, seqs in steps:
            seq = seqs[0].seq if seq is None and seqs else seq
            for s in seqs:
                if s.seq == seq:
                    context.append(s.context)
                    mass.append(_step_mass(s.mass))
    except KvtierError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # json, base64, reshape errors
        raise WorkloadError(f"{p} is not a readable kvtier attention trace ({type(e).__name__}: {e})",
                            RECORD_HINT) from e
    if not mass:
        raise WorkloadError(f"trace {p} has no decode steps", "record at least one decode step (--max-tokens >= 2)")
    return Recording(str(p), header.get("model", "?"), int(header["num_layers"]), int(header["block_size"]),
                     np.array(context, dtype=np.int64), mass)


def _group_layers(mass: np.ndarray, groups: int) -> np.ndarray:
    """[Ls, nb] -> [G, nb]: the mean of the source layers at each group's relative depth."""
    ls = mass.shape[0]
    owner = np.arange(ls) * groups // ls  # [Ls] group of each source layer
    out = np.empty((groups, mass.shape[1]), dtype=np.float64)
    for g in range(groups):
        picked = owner == g
        out[g] = mass[picked].mean(axis=0) if picked.any() else mass[min(ls - 1, (2 * g + 1) * ls // (2 * groups))]
    return out


def _rescale_positions(mass: np.ndarray, context: int, block_size: int, edges: np.ndarray) -> np.ndarray:
    """[G, nb] mass over recorded blocks -> [G, U] mass over target units whose relative edges (in
    [0, 1], ``U + 1`` of them) are ``edges``."""
    nb = mass.shape[1]
    src = np.minimum(np.arange(nb + 1) * block_size, context) / context  # [nb + 1]
    cdf = np.concatenate([np.zeros((mass.shape[0], 1)), np.cumsum(mass, axis=1)], axis=1)  # [G, nb + 1]
    return np.diff(np.stack([np.interp(edges, src, row) for row in cdf]), axis=1)


def scale_recording(rec: Recording, grid: Grid) -> AccessTrace:
    """The recorded attention mapped onto the grid's model depth, context and decode length."""
    steps = grid.steps
    starts = np.concatenate([[0], np.cumsum(steps)])  # [N + 1] decode positions at step boundaries
    u_edges = np.arange(grid.num_units + 1) * grid.unit_tokens  # [U + 1]
    out = np.zeros((len(steps), grid.layer_groups, grid.num_units))
    for n in range(len(steps)):
        lo = min(rec.num_steps - 1, starts[n] * rec.num_steps // grid.decode_tokens)
        hi = max(lo + 1, starts[n + 1] * rec.num_steps // grid.decode_tokens)
        ctx = grid.prompt_tokens + starts[n + 1]
        edges = np.minimum(u_edges, ctx) / ctx
        for i in range(lo, min(hi, rec.num_steps)):
            m = _group_layers(rec.mass[i], grid.layer_groups)
            out[n] += _rescale_positions(m, int(rec.context[i]), rec.block_size, edges)
    trace = AccessTrace(out.astype(np.float32), steps, grid.prompt_tokens, grid.unit_tokens,
                        f"{Path(rec.path).name} ({rec.model}, {rec.num_steps} decode steps at context "
                        f"{rec.context[0]}-{rec.context[-1]}) scaled")
    return AccessTrace(normalized(out, trace.exists()), steps, grid.prompt_tokens, grid.unit_tokens, trace.source)

