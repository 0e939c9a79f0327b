"""llama.cpp decode throughput through llama-cpp-python's low-level API (the ``bench`` extra):
the same GGUF file, the same thread count, several sequences per ``llama_decode`` for batches (as
``llama-batched-bench`` does). Optional: ``available()`` says why it cannot run.

Decode tok/s = batch x steps / time of the steps (after the prompts are in the KV cache): the time of
``llama_decode`` alone, no sampling (kvtier's figure includes its sampler and scheduler).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass


def available() -> str | None:
    """None if llama-cpp-python can be used, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or OSError from a broken shared library
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e}); pip install '.[bench]'"
    return None


@dataclass(slots=True)
class LlamaCppRun:
    batch: int
    context: int  # prompt tokens per sequence
    kv_type: str  # "f16" | "q4_0"
    flash_attn: bool
    tok_s: float


def _quiet():
    import llama_cpp

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def sink(level, text, data):
        return None

    llama_cpp.llama_log_set(sink, None)
    return sink  # keep a reference: llama.cpp calls it later


class LlamaCpp:
    """One loaded model; ``decode`` makes a fresh context per measurement."""

    def __init__(self, gguf_path: str, threads: int):
        import llama_cpp

        self.L = llama_cpp
        self._sink = _quiet()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), params)
        assert self.model, f"llama.cpp cannot load {gguf_path}"
        self.threads = threads

    def close(self) -> None:
        self.L.llama_model_free(self.model)

    def _context(self, n_ctx: int, n_seq: int, kv_type: str, flash_attn: bool):
        L = self.L
        p = L.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, 512, 512, n_seq
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv = {"f16": L.GGML_TYPE_F16, "q4_0": L.GGML_TYPE_Q4_0}[kv_type]
        p.type_k = p.type_v = kv
        ctx = L.llama_init_from_model(self.model, p)
        assert ctx, "llama.cpp cannot create the context"
        return ctx

    def _decode(self, ctx, batch, entries: list[tuple[int, int, int]]) -> None:
        """entries: (token, position, sequence) each; logits for every entry (one per sequence in decode)."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True
        rc = self.L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"

    def decode(self, prompts: list[list[int]], steps: int, kv_type: str = "f16", flash_attn: bool = True,
               chunk: int = 512) -> float:
        """Prefill every prompt, then time ``steps`` decode steps of all sequences; tokens/s."""
        L, n_seq, length = self.L, len(prompts), len(prompts[0])
        ctx = self._context(n_seq * (length + steps + 32), n_seq, kv_type, flash_attn)
        batch = L.llama_batch_init(max(chunk, n_seq), 0, n_seq)
        try:
            for s, ids in enumerate(prompts):
                for start in range(0, length, chunk):
                    part = ids[start: start + chunk]
                    self._decode(ctx, batch, [(t, start + i, s) for i, t in enumerate(part)])
            step = lambda i: self._decode(ctx, batch, [(ids[i % length], length + i, s)  # noqa: E731
                                                       for s, ids in enumerate(prompts)])
            for i in range(2):  # warm-up: the decode graph's first run allocates
                step(i)
            L.llama_synchronize(ctx)
            t0 = time.perf_counter()
            for i in range(2, steps + 2):
                step(i)
            L.llama_synchronize(ctx)
            return n_seq * steps / (time.perf_counter() - t0)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
