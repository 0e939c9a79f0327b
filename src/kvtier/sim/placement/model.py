"""The placement problem and its cost model (arXiv 2508.13231, with migrations charged explicitly).

Decode only; weights stay in HBM; both memories are read in parallel. For a decode step and a layer
group (``m`` identical layers):

    h = m * (layer weights + B * intermediates) / HBM read
        + B * (accessed KV bytes in HBM) / HBM read + B * (new KV bytes written to HBM) / HBM write
    e = B * (accessed KV bytes off-package) / ext read + B * (new KV written off-package) / ext write

where ``B`` is the batch (every sequence has the same trace and placement) and the ext bandwidths
are the slower of the off-package memory and the link (NVLink-C2C). Migrations before simulated
step ``n`` (placement ``x[n-1] -> x[n]``) are charged in that step, spread over its ``k`` decode
steps as a background copy that shares both memories with the reads: a unit moved into HBM costs an
ext read and an HBM write of its bytes, one evicted an HBM read and an ext write. So simulated step
``n`` costs ``max(k * h + h_mig, k * e + e_mig)`` per layer group, and T adds the LM head's read per
decode step. The placement at the first step is free (it is prefill's choice). HBM holds at most
``slots`` units of each sequence (whole units are reserved, as a paged cache reserves whole blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from kvtier.sim.errors import CapacityError, WorkloadError
from kvtier.sim.placement.traces import AccessTrace, accessed


@dataclass(frozen=True)
class Machine:
    name: str
    hbm_read: float  # bytes/s
    hbm_write: float
    ext_read: float  # bytes/s, off-package KV to the GPU: min(memory, link)
    ext_write: float
    hbm_capacity: float  # bytes


def machine_from_hardware(hw) -> Machine:
    """HBM is the ``device`` tier, off-package memory the ``host`` tier behind the host-device link."""
    dev, host, link = hw.tier("device"), hw.tier("host"), hw.link("host", "device")
    return Machine(hw.name, dev.read_bw, dev.write_bw, min(host.read_bw, link.rate("host", "device")),
                   min(host.write_bw, link.rate("device", "host")), dev.capacity)


@dataclass(frozen=True)
class Workload:
    """Bytes a decode step moves, from a model shape; ``batch`` sequences decode together."""

    model: str
    num_layers: int
    layer_weight_bytes: float  # one transformer layer
    stored_weight_bytes: float  # every weight, embedding included: what HBM holds besides KV
    head_bytes: float  # LM head and final norm, read once per decode step
    intermediate_bytes: float  # activations one sequence writes and reads in one layer
    token_bytes: float  # K and V of one token in one layer
    batch: int

    @property
    def hbm_only_bytes(self) -> float:
        """Bytes only HBM serves in a decode step: every layer's weights, the LM head, activations."""
        return self.num_layers * (self.layer_weight_bytes + self.batch * self.intermediate_bytes) + self.head_bytes


def workload_for(cfg, name: str, itemsize: int, batch: int) -> Workload:
    """A ``kvtier.models.config.ModelConfig``'s bytes at ``itemsize`` bytes per element."""
    if batch < 1:
        raise WorkloadError(f"batch must be >= 1, got {batch}")
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    per_layer = (cfg.num_params() - embed - h) / cfg.num_layers
    acts = 5 * h + 2 * q + 2 * kv + 3 * i  # residual, norms, qkv, attention, o, gate_up, act, down
    return Workload(name, cfg.num_layers, per_layer * itemsize, cfg.num_params() * itemsize,
                    (cfg.vocab_size * h + h) * itemsize, 2 * acts * itemsize, 2 * kv * itemsize, batch)


@dataclass(frozen=True)
class Problem:
    """One reduced placement problem: every policy and bound is evaluated on it."""

    trace: AccessTrace
    machine: Machine
    workload: Workload
    hbm_kv: float  # bytes of HBM for the batch's KV
    sparsity: float
    accessed: np.ndarray = field(init=False, repr=False)  # [N, G, U] bool

    def __post_init__(self):
        groups = self.trace.shape[1]
        if self.workload.num_layers % groups:
            raise WorkloadError(f"{self.workload.num_layers} layers do not split into {groups} layer groups",
                                f"use a divisor of {self.workload.num_layers} for --layer-groups")
        if self.hbm_kv < 0:
            raise CapacityError(f"HBM for KV must be >= 0 bytes, got {self.hbm_kv:g}")
        object.__setattr__(self, "accessed", accessed(self.trace, self.sparsity))

    @property
    def layers_per_group(self) -> int:
        return self.workload.num_layers // self.trace.shape[1]

    @property
    def unit_bytes_full(self) -> float:
        """Bytes of one full unit of one sequence."""
        return self.trace.unit_tokens * self.workload.token_bytes * self.layers_per_group

    @property
    def slots(self) -> int:
        """Units of each sequence HBM holds (the batch's sequences are placed alike)."""
        return int(self.hbm_kv // (self.workload.batch * self.unit_bytes_full))

    @property
    def decode_tokens(self) -> int:
        return int(self.trace.steps.sum()) * self.workload.batch

    @cached_property
    def coef(self) -> Coefficients:
        return coefficients(self)


@dataclass(frozen=True)
class Coefficients:
    """Seconds per decode step and per migration, per simulated step, layer group and unit."""

    h0: float  # HBM-only seconds of one layer group per decode step (weights, intermediates)
    head: float  # seconds of the LM head per decode step
    ch: np.ndarray  # [N, G, U] HBM seconds per decode step if the unit is in HBM (reads + writes)
    ce: np.ndarray  # [N, G, U] ext seconds per decode step if it is not
    mig_bytes: np.ndarray  # [N, U] batch bytes of a unit moved before step n (its size after step n-1)
    in_h: float  # HBM seconds per byte moved in (write); in_e: ext seconds (read)
    in_e: float
    out_h: float  # ... per byte evicted: HBM read, ext write
    out_e: float


def coefficients(p: Problem) -> Coefficients:
    mc, w, tr = p.machine, p.workload, p.trace
    m, b = p.layers_per_group, w.batch
    fill = tr.unit_fill()  # [N, U] tokens
    prev = np.vstack([np.clip(tr.prompt_tokens - np.arange(fill.shape[1]) * tr.unit_tokens, 0, tr.unit_tokens),
                      fill[:-1]])  # [N, U] tokens at the start of each step
    unit_bytes = fill * w.token_bytes * m  # [N, U] one sequence
    write = (fill - prev) / tr.steps[:, None] * w.token_bytes * m  # [N, U] bytes written per decode step
    reads = p.accessed * unit_bytes[:, None, :]  # [N, G, U]
    ch = b * (reads / mc.hbm_read + write[:, None, :] / mc.hbm_write)
    ce = b * (reads / mc.ext_read + write[:, None, :] / mc.ext_write)
    h0 = m * (w.layer_weight_bytes + b * w.intermediate_bytes) / mc.hbm_read
    mig = b * prev * w.token_bytes * m
    mig[0] = 0.0  # the first placement is prefill's
    return Coefficients(h0, w.head_bytes / mc.hbm_read, ch, ce, mig, 1 / mc.hbm_write, 1 / mc.ext_read,
                        1 / mc.hbm_read, 1 / mc.ext_write)


@dataclass(frozen=True)
class Result:
    seconds: float  # T: all decode steps of the batch
    tokens_per_s: float
    bytes_in: float  # migrated into HBM over the run (whole batch)
    bytes_out: float


def check_schedule(p: Problem, x: np.ndarray, capacity: bool = True) -> None:
    """A schedule is [N, G, U] bool, only on units that exist, within HBM's slots at every step."""
    assert x.shape == p.trace.shape and x.dtype == bool, (x.shape, x.dtype)
    assert not np.any(x & ~p.trace.exists()[:, None, :]), "a schedule places units that do not exist yet"
    if capacity:
        worst = int(x.sum(axis=(1, 2)).max())
        assert worst <= p.slots, f"a schedule holds {worst} units in HBM, which has {p.slots} slots"


def step_times(p: Problem, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seconds [N, G] of each simulated step and layer group, and bytes moved in and out [2, N] (whole
    batch), for a schedule ``x`` [N, G, U]."""
    c = p.coef
    k = p.trace.steps[:, None].astype(np.float64)  # [N, 1]
    xf = x.astype(np.float64)
    h = k * (c.h0 + (c.ch * xf).sum(axis=2))  # [N, G]
    e = k * (c.ce * (1.0 - xf)).sum(axis=2)
    before = np.concatenate([x[:1], x[:-1]])  # placement before each step (none moves before the first)
    b_in = ((x & ~before) * c.mig_bytes[:, None, :]).sum(axis=2)  # [N, G] bytes
    b_out = ((before & ~x) * c.mig_bytes[:, None, :]).sum(axis=2)
    seconds = np.maximum(h + c.in_h * b_in + c.out_h * b_out, e + c.in_e * b_in + c.out_e * b_out)
    return seconds, np.stack([b_in.sum(axis=1), b_out.sum(axis=1)])


def evaluate(p: Problem, x: np.ndarray, capacity: bool = True) -> Result:
    """T and throughput of a placement schedule (``capacity=False`` for unlimited HBM)."""
    check_schedule(p, x, capacity)
    seconds, moved = step_times(p, x)
    total = float(seconds.sum() + p.trace.steps.sum() * p.coef.head)
    return Result(total, p.decode_tokens / total, float(moved[0].sum()), float(moved[1].sum()))
