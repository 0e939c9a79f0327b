"""``kvtier eval``: the accuracy of KV policies against the plain engine on the same model.

Each policy with its options (``kcache:top_n=0.1``) becomes a row of:

- greedy agreement: free-running greedy outputs on fixed prompts, share of tokens before each
  output's first divergence from the plain engine's, and the earliest divergence;
- teacher-forced agreement and KL divergence: the plain engine's greedy outputs are forced token by
  token through decode steps (where lossy policies act), and at each position the policy's
  next-token distribution q is compared with the plain one p: top-1 match and KL(p || q);
- perplexity of a real English text (CPython's Language Reference topics, ``utils/texts.py``):
  windows of the text are prefilled for ``PPL_PREFIX`` tokens, the rest is forced through decode
  steps and scored;
- retrieval: a pass key or a key-value pair planted at several depths of long filler contexts,
  the answer read greedily (accuracy per task and length).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

import torch

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.compare import COMPARE_PROMPTS, agreement
from kvtier.errors import ConfigError
from kvtier.kernels.formats import HACK_FORMATS
from kvtier.kv.policies import make_policy
from kvtier.sampling_params import SamplingParams
from kvtier.utils.texts import english_tokens

KV_DTYPE_KEY = "kv_dtype"  # in a spec: the row's KV format, not a policy option
PPL_PREFIX = 128  # tokens of each perplexity window that are prefilled, not scored
ANSWER_TOKENS = 8


@dataclass(slots=True)
class EvalSettings:
    max_tokens: int = 256  # greedy tokens per agreement prompt
    ppl_tokens: int = 8192  # tokens of English text scored in windows
    ppl_window: int = 1024
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096)  # retrieval context lengths (tokens)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    tasks: tuple[str, ...] = ("passkey", "kv")
    prompts: tuple[str, ...] = tuple(COMPARE_PROMPTS)
    context_tokens: int = 0  # > 0: the agreement prompts are that many tokens of English text instead


@dataclass(slots=True)
class EvalRow:
    label: str
    policy: str
    options: dict
    lossless: bool
    agreement: float | None = None
    first_divergence: int | None = None
    forced_agreement: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    perplexity: float | None = None
    retrieval: dict[str, float] = field(default_factory=dict)  # "task@length" -> accuracy
    retrieval_accuracy: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def parse_spec(text: str) -> tuple[str, dict]:
    """``kcache:top_n=0.1,renormalize=false`` -> ("kcache", {"top_n": 0.1, "renormalize": False}).

    The key ``kv_dtype`` sets the row's KV format instead of a policy option: ``plain:kv_dtype=hack4``
    runs the plain policy over a HACK 4-bit cache."""
    import json

    name, _, rest = text.partition(":")
    opts = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"'{item}' in policy '{text}' is not KEY=VALUE", "write e.g. kcache:top_n=0.1")
        try:
            opts[key] = json.loads(raw)
        except ValueError:
            opts[key] = raw
    make_policy(name.strip(), _policy_options(opts))  # unknown names and options fail here, before any run
    if KV_DTYPE_KEY in opts:
        EngineConfig(kv_dtype=str(opts[KV_DTYPE_KEY]), kv_policy=name.strip())  # an unknown format fails here too
    return name.strip(), opts


# ---- teacher forcing ------------------------------------------------------------------------------

class Forcer:
    """A logits processor: records the log-probabilities at each position of each request and
    forces the reference token, so every engine sees the same contexts."""

    def __init__(self, forced: dict[str, list[int]], keep: dict[str, torch.Tensor] | None = None):
        self.forced = forced
        self.keep = keep  # request -> [T, V] log-probs of the plain engine (None: record them)
        self.logp: dict[str, list[torch.Tensor]] = {}
        self.nll: list[float] = []
        self.kl: list[float] = []
        self.top1: list[bool] = []
        self.order: list[str] = []  # request ids in prompt order

    def __call__(self, seqs, logits: torch.Tensor) -> torch.Tensor:  # logits: [N, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = torch.full_like(logits, float("-inf"))
        for i, seq in enumerate(seqs):
            ref = self.forced[seq.request_id]
            pos = seq.num_output_tokens
            self._score(seq.request_id, pos, logp[i], ref[pos])
            out[i, ref[pos]] = 0.0
        return out

    def _score(self, rid: str, pos: int, logp: torch.Tensor, ref: int) -> None:
        self.nll.append(-float(logp[ref]))
        if self.keep is None:
            self.logp.setdefault(rid, []).append(logp.clone())  # float32: float16 put a ~3e-4 floor under KL
            return
        p_log = self.keep[rid][pos]
        self.kl.append(float((p_log.exp() * (p_log - logp)).sum()))
        self.top1.append(int(p_log.argmax()) == int(logp.argmax()))


def run_forced(engine: LLMEngine, prompts: list[list[int]], forced: list[list[int]], keep=None) -> Forcer:
    """Prefill each prompt, then force its continuation through decode steps."""
    rids = [engine.add_request(None, None, SamplingParams(temperature=0.0, max_tokens=len(f), ignore_eos=True), p)
            for p, f in zip(prompts, forced, strict=True)]
    fc = Forcer(dict(zip(rids, forced, strict=True)), None if keep is None else dict(zip(rids, keep, strict=True)))
    engine.logits_processor = fc
    try:
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.logits_processor = None
    fc.logp = {r: torch.stack(fc.logp[r]) for r in rids if r in fc.logp}
    fc.order = rids
    return fc


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    rids = [engine.add_request(None, None, params, p) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[r] for r in rids]


# ---- retrieval ------------------------------------------------------------------------------------

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
SYLLABLES = ["ka", "lo", "mi", "ren", "tos", "va", "dur", "pel", "sin", "gor", "bex", "nu"]


def retrieval_prompt(tok, task: str, length: int, depth: float, rng: random.Random) -> tuple[list[int], str]:
    """A prompt of about ``length`` tokens with a fact planted at ``depth``; returns (ids, answer)."""
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        head = tok.encode("There is a pass key hidden in a lot of irrelevant text. Find it and remember it.\n")
        needle = tok.encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        tail = tok.encode("\nWhat is the pass key? The pass key is")
        fill = lambda n: (tok.encode(FILLER) * (n // 20 + 2))[:n]  # noqa: E731
    elif task == "kv":
        pairs = [("".join(rng.choice(SYLLABLES) for _ in range(3)), str(rng.randint(1000, 9999)))
                 for _ in range(length // 8 + 2)]
        name, key = pairs[0]
        head = tok.encode("Each line gives the code of a name. Remember them.\n")
        needle = tok.encode(f"The code of {name} is {key}.\n")
        tail = tok.encode(f"\nQuestion: what is the code of {name}? Answer: the code of {name} is")
        lines = sum((tok.encode(f"The code of {n} is {v}.\n") for n, v in pairs[1:]), [])
        fill = lambda n: lines[:n]  # noqa: E731
    else:
        raise ConfigError(f"unknown retrieval task '{task}'", "use passkey or kv")
    room = length - len(head) - len(needle) - len(tail)
    if room < 0:
        raise ConfigError(f"retrieval length {length} is too short", f"use lengths of at least {length - room}")
    body = fill(room)
    at = int(len(body) * depth)
    return head + body[:at] + needle + body[at:] + tail, key


def retrieval(engine: LLMEngine, settings: EvalSettings, seed: int = 0) -> dict[str, float]:
    tok, rng = engine.tokenizer, random.Random(seed)
    cases = [(task, n, retrieval_prompt(tok, task, n, d, rng)) for task in settings.tasks
             for n in settings.lengths for d in settings.depths]
    outs = greedy(engine, [ids for _, _, (ids, _) in cases], ANSWER_TOKENS)
    hits: dict[str, list[bool]] = {}
    for (task, n, (_, key)), out in zip(cases, outs, strict=True):
        hits.setdefault(f"{task}@{n}", []).append(key in tok.decode(out))
    return {k: sum(v) / len(v) for k, v in hits.items()}


# ---- one row per policy -----------------------------------------------------------------------------

@dataclass(slots=True)
class Reference:
    """What the plain engine produced: greedy outputs and their log-probs, windows of text."""
    prompts: list[list[int]]
    outputs: list[list[int]]
    logp: list[torch.Tensor]  # per prompt [T, V] float32 (8 x 256 positions of SmolLM2's vocabulary: 400 MB)
    windows: list[list[int]]


def evaluate(base: EngineConfig, specs: list[tuple[str, dict]], settings: EvalSettings, on_row=None) -> list[EvalRow]:
    """The plain row first, then one row per (policy, options)."""
    plain = LLMEngine(_config(base, "plain", {}))
    tok = plain.tokenizer
    if tok is None:
        raise ConfigError("kvtier eval needs a model with a tokenizer", "use the default model or an HF folder")
    prompts = _agreement_prompts(plain, settings)
    t0 = time.perf_counter()
    outputs = greedy(plain, prompts, settings.max_tokens)
    fc = run_forced(plain, prompts, outputs)
    text = english_tokens(tok, settings.ppl_tokens) if settings.ppl_tokens else []
    windows = [text[i:i + settings.ppl_window] for i in range(0, len(text), settings.ppl_window)]
    windows = [w for w in windows if len(w) > PPL_PREFIX]
    ref = Reference(prompts, outputs, [fc.logp[r] for r in fc.order], windows)
    row = EvalRow("plain", "plain", {}, True, 1.0, None, 1.0, 0.0, 0.0)
    _finish(row, plain, ref, settings, t0)
    rows = [row]
    on_row and on_row(row)
    for name, opts in specs:
        rows.append(evaluate_policy(base, name, opts, plain, ref, settings))
        on_row and on_row(rows[-1])
    return rows


def _agreement_prompts(engine: LLMEngine, settings: EvalSettings) -> list[list[int]]:
    """The fixed prompts, or as many consecutive windows of ``context_tokens`` of the English text."""
    if not settings.context_tokens:
        return [engine.encode_prompt(p, None) for p in settings.prompts]
    n, c = len(settings.prompts), settings.context_tokens
    if c + settings.max_tokens > engine.max_model_len:
        raise ConfigError(f"agreement contexts of {c} tokens plus {settings.max_tokens} new ones exceed the "
                          f"model's {engine.max_model_len}", "use a smaller --context-tokens or --max-tokens")
    text = english_tokens(engine.tokenizer, n * c)
    return [text[i * c:(i + 1) * c] for i in range(n)]


def evaluate_policy(base, name: str, opts: dict, plain: LLMEngine, ref: Reference, settings) -> EvalRow:
    t0 = time.perf_counter()
    engine = LLMEngine(_config(base, name, opts), loaded=plain.loaded)
    label = name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")
    same_format = engine.config.kv_dtype == plain.config.kv_dtype
    row = EvalRow(label, name, opts, engine.policy.lossless and same_format)
    row.agreement, row.first_divergence = agreement(greedy(engine, ref.prompts, settings.max_tokens), ref.outputs)
    fc = run_forced(engine, ref.prompts, ref.outputs, keep=ref.logp)
    row.forced_agreement = sum(fc.top1) / max(len(fc.top1), 1)
    row.kl_mean = sum(fc.kl) / max(len(fc.kl), 1)
    row.kl_max = max(fc.kl, default=0.0)
    _finish(row, engine, ref, settings, t0)
    return row


def _finish(row: EvalRow, engine: LLMEngine, ref: Reference, settings: EvalSettings, t0: float) -> None:
    """Perplexity and retrieval, the same way for every row."""
    if ref.windows:
        fc = run_forced(engine, [w[:PPL_PREFIX] for w in ref.windows], [w[PPL_PREFIX:] for w in ref.windows])
        row.perplexity = float(torch.tensor(fc.nll).mean().exp())
    if settings.lengths and settings.tasks:
        row.retrieval = retrieval(engine, settings)
        row.retrieval_accuracy = sum(row.retrieval.values()) / len(row.retrieval)
    row.seconds = time.perf_counter() - t0


def _policy_options(opts: dict) -> dict:
    """A spec's options without the row's KV format: what the policy itself takes."""
    return {k: v for k, v in opts.items() if k != KV_DTYPE_KEY}


def _config(base: EngineConfig, name: str, opts: dict) -> EngineConfig:
    fields = {f: getattr(base, f) for f in base.__slots__}
    policy_opts = _policy_options(opts)
    kv_dtype = str(opts.get(KV_DTYPE_KEY, base.kv_dtype))
    hack = kv_dtype in HACK_FORMATS or base.kv_dtype in HACK_FORMATS
    block_size = None if hack else base.block_size  # a HACK cache's blocks are its partitions
    return EngineConfig(**{**fields, "kv_policy": name, "kv_policy_options": policy_opts, "kv_dtype": kv_dtype,
                           "block_size": block_size})
