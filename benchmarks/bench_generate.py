"""Decode throughput of kvtier in each weight format against llama.cpp and HF transformers' generate(),
in the same run, on the default model (SmolLM2-135M-Instruct, the same GGUF file for llama.cpp).

    python benchmarks/bench_generate.py [--scenarios 1x200,1x6000,8x200,32x200] [--formats float32,int8,...]
        [--new-tokens 64] [--no-hf] [--no-llama-cpp] [--ppl-tokens 1024]

Scenarios are BATCHxCONTEXT: that many sequences with random prompts of CONTEXT tokens (fixed seed),
decoded greedily with EOS ignored, each engine warmed up on the same workload once. kvtier: decode
tokens/s over the engine steps after the last prompt is prefilled (whole steps, wall clock). HF (whose
generate() cannot be split): batch x (new_tokens - 1) / (time(new_tokens) - time(1 token)), the prefill
and first token subtracted.
llama.cpp (llama-cpp-python, the ``bench`` extra, ``benchmarks/llamacpp_baseline.py``): the same GGUF
file and thread count, several sequences per llama_decode for batches, the decode steps timed alone;
with f16 KV (flash attention on and off) and at long context also q4_0 KV. Bytes per step = weights +
the KV cache read at the mean context, against the read bandwidth measured at the start of the run.
``--ppl-tokens N`` (0 skips) adds each format's perplexity on the first N tokens of the English text
that ``kvtier eval`` scores (CPython's Language Reference topics, ``kvtier.utils.texts``), read through
decode steps after a 128-token prefill (``accuracy.decode_perplexity``), so that a HACK KV cache's
attention on codes is what is scored. Formats: WEIGHTS[/KV], KV one of the ``--kv-dtype`` values
(``int4/bfloat16``, ``int4/hack4``).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import asdict, dataclass

import torch

from kvtier import LLM, SamplingParams
from kvtier.entrypoints.accuracy import decode_perplexity
from kvtier.kernels.qlinear import WEIGHT_FORMATS
from kvtier.models.loader import default_model_gguf, resolve_hf_folder
from kvtier.utils.membw import read_bandwidth
from kvtier.utils.texts import SOURCE, english_tokens

GGUF_KV_BYTES = {"f16": 2.0, "q4_0": 18 / 32}  # bytes per KV element in llama.cpp's cache


@dataclass(slots=True)
class Row:
    scenario: str
    engine: str
    tok_s: float
    bytes_per_step: float  # weights + KV read by one decode step


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch + length)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kvtier_decode(llm: LLM, ids: list[list[int]], n: int, repeats: int) -> float:
    """Decode tokens/s, best of ``repeats``: the wall time of whole engine steps (scheduling, forward,
    sampling, outputs) once every prompt is prefilled, so the prefill's own noise stays out. The warm-up
    is the same workload: the KV pool's pages are committed on first use (``kv/storage.py``), and a
    serving engine reaches its peak footprint once; the first touch of fresh pages costs about 8% of
    a 32 x 200 run in a VM (hypervisor faults), which is not decode speed."""
    engine = llm.engine

    def run(k: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True)
        rids = {engine.add_request(None, None, params, p) for p in ids}
        started: set[str] = set()
        while started != rids:  # prefill (chunked) until each sequence has its first token
            started |= {o.request_id for o in engine.step() if o.outputs[0].token_ids}
        tokens0, t = engine.stats.num_decode_tokens, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return (engine.stats.num_decode_tokens - tokens0) / (time.perf_counter() - t)

    run(n)  # warm-up, the measured workload itself (see above)
    return max(run(n) for _ in range(repeats))


def hf_decode(model, ids: list[list[int]], n: int, repeats: int) -> float:
    x = torch.tensor(ids)

    def run(k):
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == x.shape[1] + k

    run(n)  # warm-up, the measured workload itself, as for kvtier
    t1, tn = best_time(lambda: run(1), repeats), best_time(lambda: run(n), repeats)
    return len(ids) * (n - 1) / (tn - t1)


def parse_scenarios(text: str) -> list[tuple[int, int]]:
    return [(int(b), int(c)) for b, c in (s.split("x") for s in text.split(","))]


def kv_elements_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.kv_size


def run_kvtier(spec: str, scenarios, args, cfg_out: dict) -> list[Row]:
    """``spec``: a weight format, optionally with the KV cache dtype, e.g. ``int4/bfloat16``."""
    fmt, _, kv_dtype = spec.partition("/")
    label = fmt + (f" kv {kv_dtype}" if kv_dtype else "")
    longest = max(max(c for _, c in scenarios) + args.new_tokens, args.ppl_tokens) + 16
    llm = LLM(model="default", weights=fmt, kv_dtype=kv_dtype or "auto", max_num_seqs=max(b for b, _ in scenarios),
              max_num_batched_tokens=2048,
              max_model_len=longest, kv_cache_memory="1GiB")
    model, cfg = llm.engine.loaded.model, llm.engine.model_config
    cfg_out.update(cfg=cfg, vocab=cfg.vocab_size)
    wbytes, kv_token = model.weight_bytes_per_step(), llm.engine.layout.token_bytes
    rows = []
    for b, c in scenarios:
        tok_s = kvtier_decode(llm, prompts(b, c, cfg.vocab_size), args.new_tokens, args.repeats)
        rows.append(Row(f"{b}x{c}", f"kvtier {label}", tok_s, wbytes + b * (c + args.new_tokens / 2) * kv_token))
        print(f"  kvtier {label:<8} {b}x{c}: {tok_s:.1f} tok/s", flush=True)
    if args.ppl_tokens:
        ids = english_tokens(llm.get_tokenizer(), args.ppl_tokens)
        cfg_out.setdefault("ppl", {})[label] = decode_perplexity(llm, ids)
        print(f"  kvtier {label:<8} perplexity {cfg_out['ppl'][label]:.3f} on {len(ids)} tokens", flush=True)
    del llm, model
    gc.collect()
    return rows


def run_llama_cpp(scenarios, args, cfg, threads: int) -> list[Row]:
    from llamacpp_baseline import LlamaCpp

    path = default_model_gguf()
    lc = LlamaCpp(str(path), threads)
    kv_elems = kv_elements_per_token(cfg)
    wbytes = path.stat().st_size  # the GGUF's tensors (Q4_1 layers, Q8_0 embedding) dominate the file
    rows = []
    try:
        for b, c in scenarios:
            kinds = [("f16", True), ("f16", False)] + ([("q4_0", True)] if c >= 1000 else [])
            for kv, fa in kinds:
                tok_s = lc.decode(prompts(b, c, cfg.vocab_size), args.new_tokens, kv, fa)
                name = f"llama.cpp {kv} KV{'' if fa else ' no-FA'}"
                kv_bytes = b * (c + args.new_tokens / 2) * kv_elems * GGUF_KV_BYTES[kv]
                rows.append(Row(f"{b}x{c}", name, tok_s, wbytes + kv_bytes))
                print(f"  {name:<22} {b}x{c}: {tok_s:.1f} tok/s", flush=True)
    finally:
        lc.close()
    return rows


def run_hf(scenarios, args, cfg) -> list[Row]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(resolve_hf_folder("default")), dtype=torch.float32).eval()
    wbytes, kv_token = sum(p.numel() * 4 for p in hf.parameters()), cfg.kv_bytes_per_token(torch.float32)
    rows = []
    for b, c in scenarios:
        tok_s = hf_decode(hf, prompts(b, c, cfg.vocab_size), args.new_tokens, args.repeats)
        rows.append(Row(f"{b}x{c}", "HF float32", tok_s, wbytes + b * (c + args.new_tokens / 2) * kv_token))
        print(f"  HF float32 {b}x{c}: {tok_s:.1f} tok/s", flush=True)
    return rows


def print_table(rows: list[Row], bw: float) -> None:
    print(f"\n{'scenario':>9} {'engine':<24} {'tok/s':>7} {'x llama.cpp':>11} {'x HF':>6} {'MB/step':>8} "
          f"{'GB/s':>6} {'of bw':>6}")
    for scenario in dict.fromkeys(r.scenario for r in rows):
        group = [r for r in rows if r.scenario == scenario]
        llama = max((r.tok_s for r in group if r.engine.startswith("llama.cpp f16")), default=None)
        hf = next((r.tok_s for r in group if r.engine == "HF float32"), None)
        batch = int(scenario.split("x")[0])
        for r in group:
            gbs = r.bytes_per_step * r.tok_s / batch / 1e9
            vs_llama = f"{r.tok_s / llama:.2f}" if llama else "-"
            vs_hf = f"{r.tok_s / hf:.2f}" if hf else "-"
            print(f"{scenario:>9} {r.engine:<24} {r.tok_s:>7.1f} {vs_llama:>11} {vs_hf:>6} "
                  f"{r.bytes_per_step / 1e6:>8.0f} {gbs:>6.1f} {gbs * 1e9 / bw:>6.0%}")
    print("x llama.cpp: against the faster of llama.cpp's f16-KV rows (flash attention on/off) in the same scenario")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="1x200,1x6000,8x200,32x200", help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--formats", default=",".join([*WEIGHT_FORMATS, "float32/bfloat16", "int4/bfloat16"]),
                    help="kvtier weight formats, each optionally /KV_DTYPE (the KV cache's, e.g. int4/bfloat16)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="best of N timings (kvtier, HF)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp baseline")
    ap.add_argument("--ppl-tokens", type=int, default=1024, help="English tokens for perplexity per format (0: skip)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    scenarios = parse_scenarios(args.scenarios)
    threads = torch.get_num_threads()

    bw = read_bandwidth()
    print(f"machine: {threads} threads, measured read bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    info: dict = {}
    rows: list[Row] = []
    for fmt in args.formats.split(","):
        rows += run_kvtier(fmt, scenarios, args, info)
    if args.no_llama_cpp:
        print("llama.cpp: skipped (--no-llama-cpp)")
    else:
        from llamacpp_baseline import available

        why = available()
        if why:
            print(f"llama.cpp: not measured: {why}")
        else:
            rows += run_llama_cpp(scenarios, args, info["cfg"], threads)
    if not args.no_hf:
        rows += run_hf(scenarios, args, info["cfg"])
    print_table(rows, bw)
    if info.get("ppl"):
        print(f"perplexity on {SOURCE} (first {args.ppl_tokens} tokens): "
              + ", ".join(f"{k} {v:.3f}" for k, v in info["ppl"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bandwidth_gb_s": bw / 1e9, "rows": [asdict(r) for r in rows],
                       "perplexity": info.get("ppl")}, f, indent=2)


if __name__ == "__main__":
    main()
