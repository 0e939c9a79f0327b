"""Decode throughput of kvtier against HF transformers' generate(), in the same run, same weights.

    python benchmarks/bench_generate.py [--batches 1,8,32] [--prompt-len 200] [--new-tokens 128]

Both engines get the same random prompts (fixed seed) and decode greedily with EOS ignored.
Decode tokens/s = batch x (new_tokens - 1) / (time(new_tokens) - time(1 token)): the prefill and
the first token are measured once and subtracted, the same way for both engines. Achieved
bandwidth = bytes a decode step reads (weights, plus the KV cache) x steps/s, against the machine's
read bandwidth measured at the start of the run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvtier import LLM, SamplingParams
from kvtier.models.loader import resolve_hf_folder
from kvtier.utils.membw import read_bandwidth


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def kvtier_decode(llm: LLM, ids: list[list[int]], n: int, repeats: int) -> float:
    def run(k):
        outs = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True), use_tqdm=False)
        assert all(len(o.token_ids) == k for o in outs)

    run(2)  # warm-up
    t1, tn = best_time(lambda: run(1), repeats), best_time(lambda: run(n), repeats)
    return len(ids) * (n - 1) / (tn - t1)


def hf_decode(model, ids: list[list[int]], n: int, repeats: int) -> float:
    x = torch.tensor(ids)

    def run(k):
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == x.shape[1] + k

    run(2)
    t1, tn = best_time(lambda: run(1), repeats), best_time(lambda: run(n), repeats)
    return len(ids) * (n - 1) / (tn - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    bw = read_bandwidth()
    print(f"machine: {torch.get_num_threads()} threads, measured read bandwidth {bw / 1e9:.1f} GB/s")
    llm = LLM(model="default", max_num_seqs=max(batches), max_num_batched_tokens=2048)
    model = llm.engine.loaded.model
    cfg = llm.engine.model_config
    wbytes = model.weight_bytes_per_step()
    kv_token = cfg.kv_bytes_per_token(model.dtype)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(resolve_hf_folder("default")), dtype=torch.float32).eval()

    rows = []
    header = (f"{'batch':>5} {'HF tok/s':>9} {'kvtier tok/s':>12} {'ratio':>6} {'step ms':>8} "
              f"{'weights GB/s':>12} {'+KV GB/s':>9} {'of limit':>8}")
    print(header)
    for b in batches:
        ids = prompts(b, args.prompt_len, cfg.vocab_size)
        ours = kvtier_decode(llm, ids, args.new_tokens, args.repeats)
        base = hf_decode(hf, ids, args.new_tokens, args.repeats) if hf is not None else None
        steps = ours / b
        ctx = args.prompt_len + args.new_tokens / 2  # mean context over the decode
        w_bw = wbytes * steps
        total_bw = (wbytes + b * ctx * kv_token) * steps
        row = {"batch": b, "hf_tok_s": base, "kvtier_tok_s": ours, "ratio": ours / base if base else None,
               "step_ms": 1e3 / steps, "weights_gb_s": w_bw / 1e9, "weights_kv_gb_s": total_bw / 1e9,
               "share_of_read_bw": total_bw / bw}
        rows.append(row)
        print(f"{b:>5} {base or float('nan'):>9.1f} {ours:>12.1f} {row['ratio'] or float('nan'):>6.2f} "
              f"{row['step_ms']:>8.1f} {w_bw / 1e9:>12.1f} {total_bw / 1e9:>9.1f} {total_bw / bw:>8.0%}")
    print(f"weights read per decode step: {wbytes / 1e6:.0f} MB; KV per token: {kv_token / 1e3:.1f} KB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"read_bandwidth_gb_s": bw / 1e9, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
