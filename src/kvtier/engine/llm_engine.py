"""The engine: requests in, one scheduled step at a time, outputs back.

``add_request`` checks and queues a request; ``step`` schedules a batch, runs it, samples, applies
stop conditions and returns the outputs of every request that moved.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.config import EngineConfig
from kvtier.engine.kv_stats import KVStats
from kvtier.engine.model_runner import ModelRunner
from kvtier.engine.outputs import CompletionOutput, RequestOutput, RequestStats
from kvtier.engine.sampler import sample
from kvtier.engine.scheduler import Scheduler, SchedulerConfig
from kvtier.engine.sequence import Sequence
from kvtier.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kvtier.errors import ConfigError, RequestError
from kvtier.kv.block_manager import BlockManager
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.cache import TieredKVCache
from kvtier.kv.hack_storage import HackStorage, allocate_tails
from kvtier.kv.hack_storage import unsupported as hack_unsupported
from kvtier.kv.manager import KVManager
from kvtier.kv.setup import plan_kv
from kvtier.kv.storage import KVLayout, check_disk_dir, make_storages, memories
from kvtier.kv.tiers import TierBudget
from kvtier.kv.trace import TraceWriter
from kvtier.models.loader import LoadedModel, load_model
from kvtier.utils.paths import cache_dir
from kvtier.utils.units import parse_bytes

AUTO_KV_MEMORY_CPU = 4 * 2**30


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    generators: list[torch.Generator | None]


@dataclass(slots=True)
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    forward_s: float = 0.0  # model + sampling time over all steps
    decode_only_steps: int = 0
    decode_only_s: float = 0.0  # time of steps that ran decodes only
    decode_only_tokens: int = 0
    peak_blocks_used: int = 0
    longest_prompt: int = 0  # tokens
    step_log: list[dict] = field(default_factory=list)


class LLMEngine:
    def __init__(self, config: EngineConfig, log_steps: bool = False, loaded: LoadedModel | None = None):
        """``loaded``: reuse weights already in memory (e.g. to run several KV policies)."""
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = config.torch_device()
        self.loaded = loaded or load_model(config.model, config.load_format, config.torch_dtype(device), device,
                                           config.hf_overrides, config.seed, config.weights)
        self.model_config = cfg = self.loaded.config
        self.tokenizer = self._tokenizer()
        self.max_model_len = self._max_model_len()
        self.layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size,
                               config.kv_torch_dtype(self.loaded.model.dtype), config.kv_format())
        self._check_head_dim()
        self._build_kv(device)
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.log_steps = log_steps
        self.measure_attention = False  # account attention mass per tier even if the policy does not observe it
        self.logits_processor = None  # (sequences, logits [N, V]) -> logits, before sampling (eval uses it)
        self.incremental_text = False  # servers stream text; offline runs decode once at the end
        self._ids = itertools.count()

    # ---- set-up -------------------------------------------------------------------------------
    def _tokenizer(self) -> Tokenizer | None:
        if self.loaded.tokenizer_dir is None:
            return None
        tok = Tokenizer(self.loaded.tokenizer_dir)
        return tok if tok.vocab_size <= self.model_config.vocab_size else None

    def _max_model_len(self) -> int:
        cfg = self.model_config
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            limit = min(limit, cfg.sliding_window)  # within the window, full attention is exact
        asked = self.config.max_model_len
        if asked is not None and asked > limit:
            raise ConfigError(f"max_model_len {asked} exceeds the model's context of {limit} tokens",
                              f"use --max-model-len {limit} or less")
        return asked or limit

    def _build_kv(self, device: torch.device) -> None:
        """Policy, storage targets in memory tiers, block placement, scheduler and cache."""
        cfg, lay = self.config, self.layout
        need = -(-self.max_model_len // cfg.block_size)
        plan = plan_kv(cfg.kv_policy, cfg.kv_policy_options, cfg.kv_tiers, self._device_budget(device),
                       lay.block_bytes, lay.part_bytes, need, cfg.block_size)
        self.policy, self.kv_plan = plan.policy, plan
        disk = any("disk" in t.tiers for t in plan.targets)
        mems = memories(device, check_disk_dir(cfg.kv_disk_dir or cache_dir("kv-disk")) if disk else None)
        self.storages = self._storages(plan.targets, mems, device)
        self.placement = plan.placement()
        self.pool = BlockPool(plan.num_blocks)
        self.cache = TieredKVCache(self.storages, self.placement, self.policy, self.model_config.head_dim**-0.5,
                                   cfg.block_size, device)
        self.kv = KVManager(self.policy, self.placement, mover=self.cache.move)
        self.scheduler = Scheduler(
            SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enable_chunked_prefill),
            BlockManager(self.pool, cfg.block_size, self.kv),
        )
        self.runner = ModelRunner(self.loaded.model, self.cache)
        exempt = len(getattr(self.policy, "exempt_layers", ())) if self.policy.name == "kcache" else None
        self.kv_stats = KVStats(lay, self.placement, exempt)
        self.tracer = TraceWriter(cfg.kv_trace, self.model_config, lay) if cfg.kv_trace else None

    def _storages(self, targets, mems, device: torch.device) -> list:
        lay = self.layout
        if lay.fmt is None:
            return make_storages(lay, targets, mems)
        self._check_hack(targets, mems, device)
        self.kv_tails = allocate_tails(lay, self.config.max_num_seqs, mems["device"])
        return [HackStorage(lay, t, mems, self.kv_tails) for t in targets]

    def _check_head_dim(self) -> None:
        fmt, d = self.layout.fmt, self.layout.head_dim
        if fmt is not None and d % fmt.pi:
            raise ConfigError(f"KV format {fmt.name} quantizes K in partitions of {fmt.pi} along head_dim, but this "
                              f"model's head_dim is {d}", "use a float --kv-dtype (bfloat16, float16) with this model")

    def _check_hack(self, targets, mems, device: torch.device) -> None:
        """What a HACK-coded cache cannot do yet, refused at start-up rather than mid-run."""
        name, policy = self.layout.fmt.name, self.policy
        why = hack_unsupported(policy, bool(self.config.kv_trace))
        if why is None and any(mems[t.k_tier].device != device or t.k_tier != t.v_tier for t in targets):
            why = "its blocks must sit on the engine's device, K and V together (HACK reads them on the codes there)"
        if why:
            raise ConfigError(f"KV format {name} cannot run with KV policy '{policy.name}': {why}",
                              "use --kv-policy plain or static, or a float --kv-dtype (bfloat16, float16)")

    def _device_budget(self, device: torch.device) -> TierBudget:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return TierBudget("device", blocks=cfg.num_kv_blocks)
        if cfg.kv_cache_memory == "auto":
            return TierBudget("device", nbytes=self._auto_kv_bytes(device))
        return TierBudget("device", nbytes=parse_bytes(cfg.kv_cache_memory, "kv_cache_memory"))

    def _auto_kv_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.8)
        need = -(-self.max_model_len // self.config.block_size) * self.layout.block_bytes
        return max(AUTO_KV_MEMORY_CPU, need)

    # ---- requests -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is None:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer", "pass prompt_token_ids instead of text")
            if not isinstance(prompt, str):
                raise RequestError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = list(prompt_token_ids)
        if not ids:
            raise RequestError("the prompt is empty", "send at least one token")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens but the context (max_model_len) is {self.max_model_len} "
                "and must keep room for one new token",
                "shorten the prompt" + (" or raise --max-model-len" if self.max_model_len <
                                        self.model_config.max_position_embeddings else ""),
            )
        return ids

    def add_request(self, request_id: str | None, prompt: str | None, params,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None) -> str:
        """Queue a request (validated first); ``arrival_time`` (time.perf_counter()) defaults to now,
        a server passes when the HTTP request arrived so TTFT counts its wait."""
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.encode_prompt(prompt, prompt_token_ids)
        self.stats.longest_prompt = max(self.stats.longest_prompt, len(ids))
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seqs, detoks, gens = [], [], []
        for i in range(params.n):
            seq = Sequence(next(self._ids), request_id, ids, params, max_tokens, index=i)
            if arrival_time is not None:
                seq.stats.arrival = arrival_time
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                          if self.tokenizer is not None else None)
            gens.append(None if params.seed is None else
                        torch.Generator(device=self.runner.device).manual_seed(params.seed + i))
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, prompt, seqs, detoks, gens)
        return request_id

    def abort_request(self, request_id: str) -> None:
        """Cancel a request; its KV blocks are free at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            assert not self.scheduler.has_unfinished(), "scheduler stalled with work left"
            return []
        t0 = time.perf_counter()
        self.kv.before_step([s.block_table for s, _ in batch.scheduled()])
        moves = self.kv.take_moves()  # the scheduler's swaps and the policy's migrations
        observe = bool(batch.decodes) and (self.policy.observes_attention or self.tracer is not None
                                           or self.measure_attention)
        self.cache.trace_layers = self.tracer is not None
        seqs, logits = self.runner.run(batch, observe)
        mass = self._observed(batch) if observe else None
        for seq, n in batch.scheduled():
            seq.num_computed_tokens += n
        if self.logits_processor is not None:
            logits = self.logits_processor(seqs, logits)
        tokens = sample(logits, [s.params for s in seqs], [self._generator(s) for s in seqs])
        now = time.perf_counter()
        self._account(batch, now - t0, self.kv_stats.step(self.cache.tokens_read, self.cache.v_rows_read, moves,
                                                          mass))
        touched = {}
        for seq, tok in zip(seqs, tokens, strict=True):
            self._append(seq, tok, now)
            touched[seq.request_id] = None
        return [self._output(self.requests[r]) for r in touched if r in self.requests]

    def _generator(self, seq: Sequence) -> torch.Generator:
        return self.requests[seq.request_id].generators[seq.index] or self.generator

    def _observed(self, batch) -> np.ndarray:
        """Hand the step's attention mass per block to the policy (and the trace); returns it."""
        obs = self.cache.obs
        mass = obs.mass.cpu().numpy()
        blocks = np.nonzero(mass)[0]
        self.kv.observe(blocks, mass[blocks])
        if self.tracer is not None:
            self.tracer.write(self.stats.num_steps + 1, batch.decodes, obs.layers)
        return mass

    def _account(self, batch, seconds: float, kv_record: dict) -> None:
        st = self.stats
        st.num_steps += 1
        st.forward_s += seconds
        st.num_decode_tokens += len(batch.decodes)
        st.num_prefill_tokens += batch.num_tokens - len(batch.decodes)
        if not batch.prefills:
            st.decode_only_steps += 1
            st.decode_only_s += seconds
            st.decode_only_tokens += len(batch.decodes)
        st.peak_blocks_used = max(st.peak_blocks_used, self.pool.num_used)
        if self.log_steps:
            st.step_log.append({
                "step": st.num_steps, "seconds": seconds, "num_decode": len(batch.decodes),
                "decode_context": [s.num_computed_tokens for s in batch.decodes],
                "prefill_chunks": [(s.num_computed_tokens - n, n) for s, n in batch.prefills],
                "blocks_used": self.pool.num_used, "preempted": len(batch.preempted), "kv": kv_record,
            })

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.token_ids.append(token)
        st = seq.stats
        if st.first_token is None:
            st.first_token = now
        st.last_token = now
        req = self.requests[seq.request_id]
        detok = req.detoks[seq.index]
        p = seq.params
        can_stop = seq.num_output_tokens >= p.min_tokens
        if detok is not None and (p.stop or self.incremental_text):
            delta = detok.step(seq.output_token_ids)
            if can_stop and p.stop and delta and self._stop_string(seq, detok, len(delta)):
                return
        if can_stop and not p.ignore_eos and token in self.eos_ids:
            self._finish(seq, "stop", None)
        elif can_stop and token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif seq.num_output_tokens >= seq.max_tokens:
            self._finish(seq, "length", None)

    def _stop_string(self, seq: Sequence, detok: IncrementalDetokenizer, new_chars: int) -> bool:
        text = detok.text
        for s in seq.params.stop:
            i = text.find(s, max(0, len(text) - new_chars - len(s) + 1))  # only matches the new text completes
            if i >= 0:
                detok.text = text[:i]
                self._finish(seq, "stop", s, flush=False)
                return True
        return False

    def _finish(self, seq: Sequence, reason: str, stop_reason, flush: bool = True) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        seq.stats.finished = time.perf_counter()
        detok = self.requests[seq.request_id].detoks[seq.index]
        if detok is not None and flush:
            if self.incremental_text or seq.params.stop:
                detok.flush(seq.output_token_ids)
            else:
                detok.text = self.tokenizer.decode(seq.output_token_ids, seq.params.skip_special_tokens)

    def _output(self, req: Request) -> RequestOutput:
        outs, stats = [], []
        for seq, detok in zip(req.seqs, req.detoks, strict=True):
            text = detok.text if detok is not None else ""
            outs.append(CompletionOutput(seq.index, text, seq.output_token_ids, seq.finish_reason, seq.stop_reason))
            stats.append(_stats(seq))
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            self.requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt, req.seqs[0].prompt_token_ids, outs, finished, stats)

    # ---- reports ------------------------------------------------------------------------------
    def kv_usage(self) -> dict[str, dict]:
        """Blocks and bytes per memory tier, now and at the peak."""
        now, peak = self.kv_stats.usage(), self.kv_stats.usage(peak=True)
        for tier, u in now.items():
            u["peak_bytes"] = peak[tier]["bytes_used"]
        return now


def _stats(seq: Sequence) -> RequestStats:
    st = seq.stats
    since = lambda t: None if t is None else t - st.arrival  # noqa: E731
    decode = None if st.first_token is None or st.last_token is None else st.last_token - st.first_token
    return RequestStats(seq.num_prompt_tokens, seq.num_output_tokens, since(st.first_token), since(st.finished),
                        decode, st.num_preemptions)
