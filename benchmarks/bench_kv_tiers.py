"""KV policies under a small fast tier: where attention mass is served from, what migrates, speed.

    python benchmarks/bench_kv_tiers.py [--batch 32] [--prompt-tokens 2048] [--new-tokens 64]
        [--fast-share 0.25] [--policies plain,static,swap,dynamic,kcache] [--dynamic-max-moves 128] [--json FILE]

Prompts are windows of real English text (CPython's Language Reference topics), decoded greedily.
The plain run gives the working set (peak KV blocks); tiered policies then get a fast tier
(``device``) of ``--fast-share`` of it and a host tier of twice it (KCache: the fast tier holds K
of every block, V lives on the host). Per policy: the share of attention mass served from the fast
tier (measured on every decode step, whether or not the policy observes attention), the share of
KV blocks held there at the peak, KV bytes migrated per generated token, V rows KCache read per
token and layer, decode tokens/s, and greedy agreement with plain. Goal (issue 6): ``dynamic``
serves >= 90% of the mass from the fast tier while holding <= 25% of the blocks there; ``kcache``
reads only N V rows per head per step. On a CPU-only machine both tiers are CPU memory, so the
tok/s column shows the policies' overhead, not their GPU gain (``kvtier simulate`` predicts that).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.entrypoints.compare import agreement
from kvtier.entrypoints.eval import greedy
from kvtier.utils.texts import english_tokens


@dataclass(slots=True)
class Row:
    policy: str
    tiers: str
    fast_mass_share: float | None
    oracle_mass_share: float | None  # the bound: the top blocks by mass in the fast tier at every step
    fast_block_share: float  # peak fast-tier blocks / peak blocks
    migrated_bytes_per_token: float
    v_rows_per_token_layer_head: float | None
    decode_tok_s: float
    agreement: float
    seconds: float


def run(cfg: EngineConfig, loaded, prompts, new_tokens: int):
    engine = LLMEngine(cfg, loaded=loaded)
    engine.measure_attention = True
    t = time.perf_counter()
    outs = greedy(engine, prompts, new_tokens)
    return engine, outs, time.perf_counter() - t


def row(name: str, tiers: str, engine: LLMEngine, outs, ref, seconds: float) -> Row:
    kv, st = engine.kv_stats.totals, engine.stats
    peak = engine.kv_stats.usage(peak=True)
    fast = peak.get("device", {}).get("blocks_used", 0)
    total = sum(kv.peak_blocks.values()) or 1
    tokens = max(st.num_decode_tokens, 1)
    lay = engine.layout
    kc_layers = lay.num_layers - len(getattr(engine.policy, "exempt_layers", ()))
    v_rows = kv.v_rows_read / (tokens * kc_layers * lay.num_kv_heads) if name == "kcache" else None
    tok_s = st.decode_only_tokens / st.decode_only_s if st.decode_only_s else 0.0
    return Row(name, tiers, kv.fast_mass_share, kv.oracle_mass_share, fast / total,
               sum(kv.bytes_migrated_in.values()) / tokens, v_rows, tok_s, agreement(outs, ref)[0], seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fast-share", type=float, default=0.25)
    ap.add_argument("--policies", default="plain,static,swap,dynamic,kcache")
    ap.add_argument("--kcache-top-n", type=float, default=0.1)
    ap.add_argument("--dynamic-max-moves", type=int, default=128, help="blocks dynamic may migrate per step")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    bs = 16
    max_len = -(-(a.prompt_tokens + a.new_tokens) // bs) * bs
    base = dict(max_model_len=max_len, block_size=bs, max_num_batched_tokens=2048, max_num_seqs=a.batch)
    plain = LLMEngine(EngineConfig(**base))
    text = english_tokens(plain.tokenizer, a.batch * a.prompt_tokens)
    prompts = [text[i * a.prompt_tokens:(i + 1) * a.prompt_tokens] for i in range(a.batch)]
    plain.measure_attention = True
    t = time.perf_counter()
    ref = greedy(plain, prompts, a.new_tokens)
    rows = [row("plain", "-", plain, ref, ref, time.perf_counter() - t)]
    work = plain.stats.peak_blocks_used
    fast, host = max(int(work * a.fast_share), -(-max_len // bs)), 2 * work
    print(f"batch {a.batch} x {a.prompt_tokens} prompt tokens + {a.new_tokens} new; working set {work} blocks, "
          f"fast tier {fast} blocks ({100 * fast / work:.0f}%)", flush=True)
    for name in [p for p in a.policies.split(",") if p != "plain"]:
        dev = work // 2 + 1 if name == "kcache" else fast  # KCache: K of every block (half its bytes)
        tiers = f"device={dev}blocks,host={host}blocks"
        opts = {"top_n": a.kcache_top_n} if name == "kcache" else {}
        if name == "dynamic" and a.dynamic_max_moves is not None:
            opts = {"max_moves": a.dynamic_max_moves}
        engine, outs, secs = run(EngineConfig(**base, kv_policy=name, kv_tiers=tiers, kv_policy_options=opts),
                                 plain.loaded, prompts, a.new_tokens)
        rows.append(row(name, tiers, engine, outs, ref, secs))
        print(f"  {name}: {secs:.1f} s", flush=True)
    print_rows(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


def print_rows(rows: list[Row]) -> None:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"{'policy':8} {'fast mass':>9} {'oracle':>7} {'fast blocks':>11} {'migr B/tok':>11} {'V rows/tok':>10} "
          f"{'tok/s':>7} {'agree':>7}")
    for r in rows:
        vr = "-" if r.v_rows_per_token_layer_head is None else f"{r.v_rows_per_token_layer_head:.1f}"
        print(f"{r.policy:8} {pct(r.fast_mass_share):>9} {pct(r.oracle_mass_share):>7} {pct(r.fast_block_share):>11} "
              f"{r.migrated_bytes_per_token:>11.0f} {vr:>10} {r.decode_tok_s:>7.1f} {pct(r.agreement):>7}")


if __name__ == "__main__":
    main()
