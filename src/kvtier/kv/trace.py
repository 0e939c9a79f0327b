"""Attention traces: how much attention each KV block received, per decode step, layer and KV head.

Recorded by the engine (``--trace FILE``), read by the placement study (``kvtier simulate
placement``). Format: JSON Lines.

- Line 1, the header: ``{"format": "kvtier-attention-trace", "version": 1, "num_layers": L,
  "num_kv_heads": H, "num_heads": Hq, "head_dim": D, "block_size": bs, "kv_bytes_per_token": n,
  "model": name}``.
- Then one line per decode step: ``{"step": s, "seqs": [{"seq": id, "request": rid, "context": c,
  "blocks": [b0, b1, ...], "mass": "<base64>"}, ...]}``. ``blocks`` are the sequence's logical block
  ids in table order (block i holds tokens ``[i*bs, (i+1)*bs)`` of its ``c`` tokens); ``mass`` is a
  float16 array ``[L, H, len(blocks)]`` in C order: per layer and KV head, the softmax probability
  summed over the block's tokens and over the ``Hq / H`` query heads of that KV head (so each
  ``[l, h, :]`` sums to ``Hq / H``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.errors import ConfigError

FORMAT = "kvtier-attention-trace"


@dataclass(slots=True)
class TraceSeq:
    seq: int
    request: str
    context: int
    blocks: list[int]
    mass: np.ndarray  # [L, H, len(blocks)] float32


def encode_mass(mass: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(mass, dtype=np.float16).tobytes()).decode()


def decode_mass(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).reshape(shape).astype(np.float32)


class TraceWriter:
    def __init__(self, path: str | Path, model_config, layout):
        self.path = Path(path)
        try:
            self.file = self.path.open("w")
        except OSError as e:
            raise ConfigError(f"cannot write the trace file {self.path}: {e.strerror or e}",
                              "pass --trace with a writable path") from e
        self.num_layers, self.num_kv_heads = layout.num_layers, layout.num_kv_heads
        self.block_size = layout.block_size
        header = {"format": FORMAT, "version": 1, "num_layers": layout.num_layers,
                  "num_kv_heads": layout.num_kv_heads, "num_heads": model_config.num_heads,
                  "head_dim": layout.head_dim, "block_size": layout.block_size,
                  "kv_bytes_per_token": layout.token_bytes, "model": str(getattr(model_config, "model_type", ""))}
        self.file.write(json.dumps(header) + "\n")

    def write(self, step: int, seqs: list, layers: list) -> None:
        """``seqs``: the step's decode sequences (batch order); ``layers``: per layer, per part of the cache,
        (logical ids [B, W_t], mass [B, H, W_t]) as the cache observed them."""
        out = []
        for i, seq in enumerate(seqs):
            ctx = seq.num_computed_tokens + 1
            table = seq.block_table[: -(-ctx // self.block_size)]
            pos = {b: j for j, b in enumerate(table)}
            mass = np.zeros((self.num_layers, self.num_kv_heads, len(table)), dtype=np.float32)
            for layer, pieces in enumerate(layers):
                for ids, m in pieces:
                    keep = ids[i] >= 0
                    idx = [pos[int(b)] for b in ids[i][keep]]
                    mass[layer][:, idx] = m[i].float().cpu().numpy()[:, keep]
            out.append({"seq": seq.seq_id, "request": seq.request_id, "context": ctx, "blocks": list(table),
                        "mass": encode_mass(mass)})
        self.file.write(json.dumps({"step": step, "seqs": out}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_trace(path: str | Path) -> tuple[dict, Iterator[tuple[int, list[TraceSeq]]]]:
    """The header and an iterator of (step, sequences) of a trace file."""
    f = Path(path).open()
    try:
        header = json.loads(f.readline() or "{}")
    except ValueError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        f.close()
        raise ConfigError(f"{path} is not a kvtier attention trace", "record one with kvtier generate --trace FILE")
    shape = (header["num_layers"], header["num_kv_heads"])

    def steps():
        with f:
            for line in f:
                rec = json.loads(line)
                yield rec["step"], [TraceSeq(s["seq"], s["request"], s["context"], s["blocks"],
                                             decode_mass(s["mass"], (*shape, len(s["blocks"])))) for s in rec["seqs"]]

    return header, steps()
