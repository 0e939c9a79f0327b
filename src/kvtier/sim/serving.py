"""Discrete-event serving simulation: the engine's own scheduler and KV policy on a simulated clock.

``ServingSimulator`` builds what ``LLMEngine.__init__`` builds (the KV policy, its block placement
and manager, a ``BlockPool`` of the same number of blocks, a ``BlockManager``, the ``Scheduler``:
``kv_layer.SimKV``) and then does what ``LLMEngine.step`` does, with the cost model in place of the
model runner: schedule a batch, call the KV manager's ``before_step``, advance the clock by the
step's time (moves the policy made become link transfers), add each scheduled chunk to
``num_computed_tokens``, append one (fake) token to every sequence that samples, and finish a
sequence with "length" when its output length is reached. Requests join when the clock passes
their arrival time, between steps, as in a server driving ``LLMEngine.step``.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import AUTO_KV_MEMORY_CPU
from kvtier.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from kvtier.engine.sequence import Sequence
from kvtier.errors import ConfigError
from kvtier.kv.tiers import TierBudget
from kvtier.models.config import ModelConfig
from kvtier.sampling_params import SamplingParams
from kvtier.sim.cost_model import CostModel, StepShape
from kvtier.sim.errors import CapacityError, WorkloadError
from kvtier.sim.hardware import Hardware
from kvtier.sim.kv_layer import SimKV
from kvtier.sim.metrics import RequestRecord, summarize
from kvtier.sim.model_shape import model_shape
from kvtier.utils.units import format_bytes, parse_bytes

GPU_MEMORY_UTILIZATION = 0.8  # as LLMEngine._auto_kv_bytes: 80% of the memory free after the weights
FAKE_TOKEN = 0


def resolve_dtype(dtype: str, hw: Hardware) -> str:
    """The engine's ``auto``: float32 on a CPU, bfloat16 on an accelerator (float16 where it has none)."""
    if dtype != "auto":
        return dtype
    p = hw.processor("device")
    if p.kind == "cpu":
        return "float32"
    return "bfloat16" if "bfloat16" in p.dtypes() else "float16"


@dataclass(slots=True)
class SimResult:
    records: list[RequestRecord]
    num_steps: int
    clock: float  # seconds simulated, idle gaps included
    busy: dict[str, float]  # stream -> seconds busy
    tiers: dict[str, dict]  # memory tier -> capacity, weights, KV pool, KV peak and mean use (bytes)
    link_bytes: dict[str, float]  # "src>dst" -> bytes moved between tiers
    step_log: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        out = summarize(self.records)
        span = self.clock or 1.0
        out["num_steps"] = self.num_steps
        out["utilization"] = {s: b / span for s, b in sorted(self.busy.items())}
        out["memory"] = self.tiers
        out["link_bytes"] = self.link_bytes
        return out


@dataclass(slots=True)
class _Totals:
    busy: dict = field(default_factory=lambda: defaultdict(float))
    links: dict = field(default_factory=lambda: defaultdict(float))
    block_seconds: dict = field(default_factory=lambda: defaultdict(float))  # tier -> blocks in use x seconds
    peak: dict = field(default_factory=lambda: defaultdict(float))  # tier -> most blocks in use
    steps: int = 0

    def add(self, tl, shape: StepShape, used: dict[str, float]) -> None:
        self.steps += 1
        for stream, secs in tl.busy.items():
            self.busy[stream] += secs
        for tr in shape.transfers:
            self.links[f"{tr.src}>{tr.dst}"] += tr.nbytes
        for tier, blocks in used.items():
            self.block_seconds[tier] += blocks * tl.makespan
            self.peak[tier] = max(self.peak[tier], blocks)


class ServingSimulator:
    def __init__(self, config: EngineConfig, hw: Hardware, model: ModelConfig | None = None,
                 offload: str = "fetch", prefetch_depth: int = 1, log_steps: bool = False):
        if config.weights != "float32":
            raise ConfigError(f"the simulator does not model weight format '{config.weights}' yet",
                              "simulate with --weights float32 (weights in --dtype)")
        self.config, self.hw = config, hw
        self.model = model or model_shape(config.model, config.hf_overrides)
        self.dtype = resolve_dtype(config.dtype, hw)
        self.cost = CostModel(hw, self.model, self.dtype, config.block_size, offload, prefetch_depth)
        self.max_model_len = self._max_model_len()
        need = -(-self.max_model_len // config.block_size)
        self.kv = SimKV(config, self._device_budget(), self.cost.block_bytes, config.block_size, need)
        self._check_tiers()
        self.policy, self.pool = self.kv.policy, self.kv.pool
        self.num_blocks = self.pool.num_blocks
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill),
            self.kv.block_manager,
        )
        self.log_steps = log_steps

    # ---- set-up (mirrors LLMEngine) ----------------------------------------------------------
    def _max_model_len(self) -> int:
        m = self.model
        limit = min(m.max_position_embeddings, m.sliding_window or m.max_position_embeddings)
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise ConfigError(f"max_model_len {asked} exceeds the model's context of {limit} tokens",
                              f"use --max-model-len {limit} or less")
        return asked or limit

    def _device_budget(self) -> TierBudget:
        """The device tier's default KV budget, by the engine's rules (``LLMEngine._device_budget``)."""
        cfg, bb = self.config, self.cost.block_bytes
        device = self.hw.tier(self.cost.p.memory)
        free = device.capacity - self.cost.weight_bytes
        if free <= 0:
            raise CapacityError(
                f"the weights of {self.model.num_params() / 1e9:.1f} B parameters in {self.dtype} "
                f"({format_bytes(self.cost.weight_bytes)}) do not fit the {format_bytes(device.capacity)} "
                f"of tier '{device.name}' on {self.hw.name}", "use a smaller dtype or model, or more memory")
        if cfg.num_kv_blocks is not None:
            return TierBudget("device", blocks=cfg.num_kv_blocks)
        if cfg.kv_cache_memory != "auto":
            return TierBudget("device", nbytes=parse_bytes(cfg.kv_cache_memory, "kv_cache_memory"))
        if self.cost.p.kind == "cpu":
            return TierBudget("device", nbytes=max(AUTO_KV_MEMORY_CPU, -(-self.max_model_len // cfg.block_size) * bb))
        return TierBudget("device", nbytes=int(free * GPU_MEMORY_UTILIZATION))

    def _check_tiers(self) -> None:
        """Every tier the KV policy uses must exist and hold its KV budget (plus the weights on the device)."""
        bb, home = self.cost.block_bytes, self.cost.p.memory
        for name, blocks in self.kv.capacity_by_tier().items():
            tier = self.hw.tier(name)
            weights = self.cost.weight_bytes if name == home else 0
            if blocks * bb + weights > tier.capacity:
                free = max(0, int((tier.capacity - weights) // bb))
                raise CapacityError(f"a KV budget of {int(blocks)} blocks ({format_bytes(blocks * bb)}) "
                                    f"{'and the weights ' if weights else ''}overflow tier '{name}' "
                                    f"({format_bytes(tier.capacity)}) on {self.hw.name}",
                                    f"give tier {name} {free} blocks or fewer (--num-kv-blocks, --kv-tiers)")

    # ---- the run ------------------------------------------------------------------------------
    def run(self, requests: list) -> SimResult:
        pending = deque(sorted(requests, key=lambda r: r.arrival_time))
        records: dict[int, RequestRecord] = {}
        totals, clock, log = _Totals(), 0.0, []
        while pending or self.scheduler.has_unfinished():
            while pending and pending[0].arrival_time <= clock:
                self._add(pending.popleft(), records)
            if not self.scheduler.has_unfinished():
                clock = pending[0].arrival_time
                continue
            batch = self.scheduler.schedule()
            assert not batch.is_empty, "scheduler stalled with work left"
            shape = self._shape(batch)
            tl = self.cost.step(shape)
            clock += tl.makespan
            totals.add(tl, shape, self.kv.used_by_tier())
            if self.log_steps:
                log.append(self._log_entry(clock, tl.makespan, batch))
            self.kv.observe(batch.decodes, self.model.num_layers * self.model.num_heads)
            self._commit(batch, clock, records)
        return SimResult(list(records.values()), totals.steps, clock, dict(totals.busy),
                         self._tiers(totals, clock), dict(totals.links), log)

    def _add(self, spec, records: dict[int, RequestRecord]) -> None:
        room = self.max_model_len - spec.prompt_len
        if room < 1:
            raise WorkloadError(f"request {spec.request_id} has a prompt of {spec.prompt_len} tokens but "
                                f"max_model_len is {self.max_model_len}", "shorten it or raise --max-model-len")
        seq = Sequence(len(records), spec.request_id, [FAKE_TOKEN] * spec.prompt_len,
                       SamplingParams(max_tokens=spec.output_len, ignore_eos=True, temperature=spec.temperature),
                       min(spec.output_len, room))
        seq.stats.arrival = spec.arrival_time
        records[seq.seq_id] = RequestRecord(spec.request_id, spec.arrival_time, spec.prompt_len)
        self.scheduler.add(seq)

    def _shape(self, batch: ScheduledBatch) -> StepShape:
        sampled = list(batch.decodes) + [s for s, n in batch.prefills if s.num_computed_tokens + n == s.num_tokens]
        transfers = self.kv.before_step(batch)  # the engine calls the same hook before running the step
        return StepShape(
            decode_context=[s.num_computed_tokens + 1 for s in batch.decodes],
            prefill_chunks=[(s.num_computed_tokens, n) for s, n in batch.prefills],
            num_sampled=len(sampled), random_rows=sum(not s.params.greedy for s in sampled),
            new_blocks=len(batch.new_blocks),
            decode_tokens_by_tier=self.kv.decode_tokens_by_tier(batch.decodes),
            transfers=transfers,
        )

    def _commit(self, batch: ScheduledBatch, now: float, records: dict[int, RequestRecord]) -> None:
        """What ``LLMEngine.step`` does after the forward pass, with fake tokens."""
        sampled = list(batch.decodes) + [s for s, n in batch.prefills if s.num_computed_tokens + n == s.num_tokens]
        for seq, n in batch.scheduled():
            seq.num_computed_tokens += n
        for seq in batch.preempted:
            records[seq.seq_id].num_preemptions = seq.stats.num_preemptions
        for seq in sampled:
            seq.token_ids.append(FAKE_TOKEN)
            rec = records[seq.seq_id]
            rec.token_times.append(now)
            if seq.num_output_tokens >= seq.max_tokens:
                self.scheduler.finish(seq, "length")
                rec.finished = now

    def _log_entry(self, clock: float, seconds: float, batch: ScheduledBatch) -> dict:
        return {"time": clock, "seconds": seconds, "num_decode": len(batch.decodes),
                "decode_context": [s.num_computed_tokens + 1 for s in batch.decodes],
                "prefill_chunks": [(s.num_computed_tokens, n) for s, n in batch.prefills],
                "blocks_used": self.pool.num_used, "preempted": len(batch.preempted)}

    def _tiers(self, totals: _Totals, clock: float) -> dict[str, dict]:
        bb, home = self.cost.block_bytes, self.cost.p.memory
        out = {}
        for name, blocks in self.kv.capacity_by_tier().items():
            out[name] = {"capacity": self.hw.tier(name).capacity,
                         "weights": self.cost.weight_bytes if name == home else 0,
                         "kv_pool": blocks * bb, "kv_peak": totals.peak.get(name, 0.0) * bb,
                         "kv_mean": totals.block_seconds.get(name, 0.0) / clock * bb if clock else 0.0}
        return out
