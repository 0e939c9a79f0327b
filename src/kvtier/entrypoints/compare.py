"""``kvtier compare``: the same prompts under every KV policy, one row each.

Each row: where the KV bytes lived (peak, per memory tier), what attention read from each tier,
what migrated, decode throughput, and greedy agreement with the plain paged cache (share of
identical tokens, first divergence).

Unless ``--kv-tiers`` is given, tiered policies get a fast tier of a quarter of the working set the
plain run needed (KCache: room for all K, V on the host), and the context is sized to the prompts,
so that placement, migration and swapping actually happen.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.kv.hack_storage import unsupported as hack_unsupported
from kvtier.kv.policies import POLICY_REGISTRY, make_policy
from kvtier.models.loader import LoadedModel
from kvtier.sampling_params import SamplingParams

# Varied lengths and kinds: instructions, prose continuation, code, lists, a long passage.
COMPARE_PROMPTS = [
    "The capital of France is",
    "Write a haiku about memory bandwidth.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three reasons why the sky looks blue during the day:\n1.",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker "
    "who had never once left the valley. Every morning he",
    "Q: A train leaves at 3 pm and travels 120 km at 60 km/h. When does it arrive?\nA:",
    "Translate to French: 'The weather is nice today, and we are going to the beach.'\nFrench:",
    "The history of computing is a story of memory. Early machines stored a few hundred words in mercury "
    "delay lines; later, magnetic cores gave way to DRAM, whose capacity grew a millionfold while its "
    "latency barely moved. Caches, prefetchers and ever wider buses were invented to hide that gap. "
    "Large language models bring the gap back to the front, because every generated token must read "
    "all the weights and the whole key-value cache. In this essay we explain",
]


@dataclass(slots=True)
class CompareRow:
    policy: str
    lossless: bool
    kv_bytes_peak: dict[str, int]  # per memory tier
    decode_tokens_per_s: float
    agreement: float  # share of output tokens equal to the plain engine's, up to each first divergence
    first_divergence: int | None  # earliest output position where any prompt differs; None if none
    num_preemptions: int
    seconds: float
    kv_bytes_read: dict[str, int] = field(default_factory=dict)  # by attention, per memory tier
    kv_bytes_migrated: int = 0
    fast_mass_share: float | None = None  # attention mass served from the fast tier (observing policies)

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, int | None]:
    """Share of output tokens before each output's first divergence from the reference (after it the
    contexts differ, so later tokens are not comparable), and the earliest divergence position."""
    same = total = 0
    first = None
    for out, ref in zip(outputs, reference, strict=True):
        n = max(len(out), len(ref))
        k = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), min(len(out), len(ref)))
        same, total = same + k, total + n
        if k < n:
            first = k if first is None else min(first, k)
    return (same / total if total else 1.0), first


def run_policy(config: EngineConfig, loaded: LoadedModel | None, prompts: list[str], max_tokens: int):
    engine = LLMEngine(config, loaded=loaded)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    seconds = time.perf_counter() - t
    return engine, [done[i] for i in ids], seconds


def compare(base: EngineConfig, policies: list[str] | None = None, prompts: list[str] | None = None,
            max_tokens: int = 64, on_row=None) -> list[CompareRow]:
    """Run ``prompts`` greedily under each policy (default: all registered) and the plain baseline."""
    prompts = prompts or COMPARE_PROMPTS
    names = policies or [n for n in sorted(POLICY_REGISTRY, key=lambda n: (n != "plain", n)) if runs_on(base, n)]
    plain, reference, seconds = run_policy(_with(base, "plain"), None, prompts, max_tokens)
    rows = [_row(plain, reference, reference, seconds)] if "plain" in names else []
    sizing = _sizing(base, plain, max_tokens)
    for row in rows:
        on_row and on_row(row)
    for name in names:
        if name == "plain":
            continue
        engine, outputs, seconds = run_policy(_with(base, name, sizing), plain.loaded, prompts, max_tokens)
        rows.append(_row(engine, outputs, reference, seconds))
        on_row and on_row(rows[-1])
    return rows


def runs_on(base: EngineConfig, name: str) -> bool:
    """Whether policy ``name`` can run over ``base``'s KV format (a HACK cache serves only some)."""
    return base.kv_format() is None or hack_unsupported(make_policy(name)) is None


@dataclass(slots=True)
class _Sizing:
    max_model_len: int
    tiers: str  # for tiered policies
    kcache_tiers: str  # KCache: the fast tier holds every K (half of each block), V goes to the host


def _sizing(base: EngineConfig, plain: LLMEngine, max_tokens: int) -> _Sizing:
    """A fast tier of 1/4 of the plain run's peak KV blocks (at least one full sequence), a host of
    twice the working set, the context sized to the longest prompt (unless the user set them)."""
    bs = base.block_size
    longest = max(plain.stats.longest_prompt, 1) + max_tokens
    max_len = base.max_model_len or -(-longest // bs) * bs
    need, work = -(-max_len // bs), max(plain.stats.peak_blocks_used, 1)
    host = f"host={2 * work}blocks"
    return _Sizing(max_len, f"device={max(-(-work // 4), need)}blocks,{host}",
                   f"device={max(-(-work // 2), need) + 1}blocks,{host}")


def _with(base: EngineConfig, name: str, sizing: _Sizing | None = None) -> EngineConfig:
    """``base`` running policy ``name`` (its options only if the user chose that policy)."""
    opts = base.kv_policy_options if name == base.kv_policy else {}
    over = {"kv_policy": name, "kv_policy_options": opts}
    if sizing is not None and base.kv_tiers is None and len(make_policy(name, opts).memory_tiers) > 1:
        over["kv_tiers"] = sizing.kcache_tiers if name == "kcache" else sizing.tiers
        over["max_model_len"] = sizing.max_model_len
    return EngineConfig(**{**_fields(base), **over})


def _row(engine: LLMEngine, outputs, reference, seconds: float) -> CompareRow:
    agree, first = agreement(outputs, reference)
    st, kv = engine.stats, engine.kv_stats.totals
    return CompareRow(
        policy=engine.policy.name, lossless=engine.policy.lossless,
        kv_bytes_peak={tier: u["peak_bytes"] for tier, u in engine.kv_usage().items()},
        decode_tokens_per_s=st.decode_only_tokens / st.decode_only_s if st.decode_only_s else 0.0,
        agreement=agree, first_divergence=first, num_preemptions=engine.scheduler.num_preemptions,
        seconds=seconds, kv_bytes_read=dict(kv.bytes_read), kv_bytes_migrated=sum(kv.bytes_migrated_in.values()),
        fast_mass_share=kv.fast_mass_share,
    )


def _fields(config: EngineConfig) -> dict:
    return {f: getattr(config, f) for f in config.__slots__}
