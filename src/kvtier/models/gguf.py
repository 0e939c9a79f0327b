"""GGUF files: dequantize once into a Hugging Face model folder under the user cache dir.

Tensors are read with the ``gguf`` library; config, tokenizer and chat template with transformers'
GGUF support. The result (config.json, model.safetensors, tokenizer files) loads in about a second
on later runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from kvtier.errors import ModelLoadError
from kvtier.utils.paths import cache_dir
from kvtier.utils.progress import progress_bar

# GGUF architecture -> whether llama.cpp's converter permuted the rows of Q and K for its RoPE
GGUF_ARCHS = {"llama": True, "mistral": True, "qwen2": False}
SKIPPED_TENSORS = ("rope_freqs.weight",)  # llama-3 RoPE factors: recomputed from the config
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
CONVERSION_VERSION = 2  # bump when the converted folder changes: old cache entries are redone
_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_CHUNK = 1 << 20


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unknown."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _NAMES:
        return f"model.layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (back to HF's half-split RoPE order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_key(path: Path) -> str:
    """A content key (size and both ends) that survives moving or renaming the file."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(_CHUNK))
        f.seek(max(0, path.stat().st_size - _CHUNK))
        h.update(f.read(_CHUNK))
    return h.hexdigest()[:16]


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct/IndexError... on bad bytes
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}",
                             "the file is corrupt or truncated; download it again") from e


def _arch_heads(reader, path: Path) -> tuple[str, int, int]:
    """The architecture and its query / KV head counts (for undoing the Q/K row permutation)."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(f"unsupported architecture {arch!r} in {path}",
                             f"kvtier runs the llama family (GGUF archs: {', '.join(GGUF_ARCHS)})")
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    return arch, n_head, int(_field(reader, f"{arch}.attention.head_count_kv") or n_head)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _dequantize(reader, arch: str, n_head: int, n_kv: int, path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for t in progress_bar(reader.tensors, f"dequantizing {path.name} (first load only)"):
        name = hf_name(t.name)
        if name is None:
            if t.name in SKIPPED_TENSORS:
                continue
            raise ModelLoadError(f"unexpected tensor {t.name} in {path}", f"supported GGUF archs: {list(GGUF_ARCHS)}")
        w = _unpermute_qk(t.name, _dequantize_tensor(t), arch, n_head, n_kv)
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
    return out


def _dequantize_tensor(t) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ModelLoadError(f"GGUF tensor type {t.tensor_type.name} of {t.name} is not supported",
                             f"use a file quantized as {'/'.join(DIRECT_TYPES)} or a K-quant") from e


def _unpermute_qk(name: str, w: np.ndarray, arch: str, n_head: int, n_kv: int) -> np.ndarray:
    """Rows of Q and K back to HF's order (works on float rows and on quantized codes/scales alike)."""
    if GGUF_ARCHS[arch] and ".attn_q." in name:
        return unpermute(w, n_head)
    if GGUF_ARCHS[arch] and ".attn_k." in name:
        return unpermute(w, n_kv)
    return w


# ---- direct loading: quantized tensors kept as they are stored ------------------------------------------------

DIRECT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # read without going through float32


def _blocks(t, size: int) -> np.ndarray:  # [rows, bytes] -> [rows, blocks, size] uint8
    data = np.ascontiguousarray(t.data).view(np.uint8)
    return data.reshape(data.shape[0], -1, size)


def _halves(b: np.ndarray) -> np.ndarray:  # [rows, blocks, 2] uint8 -> [rows, blocks] float16
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _q4_codes(qs: np.ndarray) -> np.ndarray:  # [rows, blocks, 16] -> [rows, blocks * 32]: low nibbles first
    return np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(qs.shape[0], -1)


def quantized_parts(t) -> tuple[int, np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(bits, codes [N, K], scales [N, K/32] float16, mins or None) of a Q8_0/Q4_0/Q4_1 tensor, else None.

    Block layouts (ggml): Q8_0 = d, qs[32] int8 (w = d q); Q4_0 = d, qs[16] (w = d (q - 8));
    Q4_1 = d, m, qs[16] (w = d q + m); a byte of qs holds element j (low nibble) and j + 16 (high)."""
    kind = t.tensor_type.name
    if kind == "Q8_0":
        b = _blocks(t, 34)
        return 8, b[..., 2:].reshape(b.shape[0], -1).view(np.int8), _halves(b[..., :2]), None
    if kind == "Q4_0":
        b = _blocks(t, 18)
        d = _halves(b[..., :2])
        return 4, _q4_codes(b[..., 2:]), d, (d * np.float16(-8)).astype(np.float16)
    if kind == "Q4_1":
        b = _blocks(t, 20)
        return 4, _q4_codes(b[..., 4:]), _halves(b[..., :2]), _halves(b[..., 2:4])
    return None


def read_gguf_tensors(path: Path) -> dict:
    """Every tensor by HF name: Q8_0 / Q4_0 / Q4_1 as ``QuantizedWeight`` (no float32 detour), float types
    as float32 tensors, other quantizations dequantized by the gguf library (K-quants)."""
    from kvtier.kernels.qlinear import QuantizedWeight

    reader = _reader(path)
    arch, n_head, n_kv = _arch_heads(reader, path)
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name in SKIPPED_TENSORS:
                continue
            raise ModelLoadError(f"unexpected tensor {t.name} in {path}", f"supported GGUF archs: {list(GGUF_ARCHS)}")
        parts = quantized_parts(t)
        if parts is None:
            w = _unpermute_qk(t.name, _dequantize_tensor(t), arch, n_head, n_kv)
            out[name] = torch.from_numpy(np.array(w, dtype=np.float32))
            continue
        bits, *arrays = parts
        arrays = [None if a is None else torch.from_numpy(np.array(_unpermute_qk(t.name, a, arch, n_head, n_kv)))
                  for a in arrays]
        out[name] = QuantizedWeight(bits, *arrays)
    return out


def _write_folder(path: Path, tmp: Path, tensors: dict) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelLoadError(f"cannot read the config or tokenizer of {path}: {e}",
                             "the file is corrupt or not a llama-family GGUF") from e
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    config.architectures = [ARCHITECTURES[config.model_type]]  # so AutoModel / transformers serve load it
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": name})


def gguf_to_hf_folder(path: Path) -> Path:
    """Convert ``path`` once; return the cached HF folder."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist", "check the path")
    target = cache_dir("models") / f"{path.stem}-{file_key(path)}-v{CONVERSION_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    reader = _reader(path)
    arch, n_head, n_kv = _arch_heads(reader, path)
    tensors = _dequantize(reader, arch, n_head, n_kv, path)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _write_folder(path, tmp, tensors)
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier copy
        os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
