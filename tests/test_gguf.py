"""GGUF loading: our dequantization matches transformers' GGUF reader; the conversion is cached."""

import time

import numpy as np
import pytest
import torch

from kvtier.models import gguf as kv_gguf
from kvtier.models.loader import default_model_gguf, resolve_hf_folder


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 3 * 2, dtype=np.float32).reshape(8 * 3, 2)  # 3 heads of dim 8
    n_head = 3
    permuted = w.reshape(n_head, 2, 8 // 2, 2).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's converter
    assert np.array_equal(kv_gguf.unpermute(permuted, n_head), w)


def test_names():
    assert kv_gguf.hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert kv_gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert kv_gguf.hf_name("blk.1.ffn_down.weight") == "model.layers.1.mlp.down_proj.weight"
    assert kv_gguf.hf_name("mystery") is None


@pytest.mark.slow
def test_dequantized_weights_equal_transformers_gguf_loader():
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF checkpoints
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = default_model_gguf()
    ours = load_file(str(resolve_hf_folder("default") / "model.safetensors"))
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    sd = ref.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, sd[name]), name
    assert set(sd) - set(ours) <= {"lm_head.weight"}  # tied to the embedding


def test_conversion_is_cached_and_fast(tmp_path):
    t = time.perf_counter()
    folder = resolve_hf_folder("default")
    assert time.perf_counter() - t < 2.0, "the second load must not dequantize again"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert kv_gguf.file_key(default_model_gguf()) in folder.name
