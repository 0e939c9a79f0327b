"""Memory accounting of KV formats against the tensors actually allocated."""

import pytest
import torch

from kvtier.errors import ConfigError
from kvtier.kernels.formats import HackFormat, kv_bytes, parse_format
from kvtier.kernels.hack import HackCache
from kvtier.kv.placement import Target
from kvtier.kv.storage import KVLayout, KVStorage, memories

ROLES = {"codes": ("k_codes", "v_codes"), "scales": ("k_scale", "v_scale"), "minima": ("k_min", "v_min"),
         "sums": ("k_sum", "v_sum")}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("name,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                        ("float16", torch.float16)])
@pytest.mark.parametrize("hkv,d,bs", [(3, 64, 16), (8, 128, 32)])
def test_float_formats_match_storage(name, dtype, hkv, d, bs):
    layers, blocks = 2, 5
    storage = KVStorage(KVLayout(layers, hkv, d, bs, dtype), Target("device", blocks, "device", "device"),
                        memories(torch.device("cpu"), None))
    acc = kv_bytes(name, hkv, d, bs)
    assert acc.block * blocks * layers == storage.nbytes
    assert acc.per_token == 2 * hkv * d * dtype.itemsize
    assert acc.scales == acc.minima == acc.sums == acc.tail_per_sequence == 0
    assert acc.amortized_per_token(7) == acc.per_token


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("pi,hkv,d", [(64, 3, 64), (64, 8, 128), (32, 2, 96), (128, 1, 128)])
@pytest.mark.parametrize("tail_dtype", [torch.float16, torch.bfloat16])
def test_hack_bytes_match_allocation(bits, pi, hkv, d, tail_dtype):
    fmt = HackFormat(bits=bits, pi=pi, tail_dtype=tail_dtype)
    blocks, slots = 7, 3
    cache = HackCache.allocate(fmt, blocks, hkv, d, slots)
    acc = kv_bytes(fmt, hkv, d)
    for role, names in ROLES.items():
        assert getattr(acc, role) * blocks == sum(nbytes(getattr(cache, n)) for n in names), role
    assert acc.tail_per_sequence * slots == nbytes(cache.v_tail)
    assert acc.block * blocks == nbytes(cache.blocks)  # the slabs hold exactly the parts
    assert acc.block * blocks + acc.tail_per_sequence * slots == nbytes(cache.blocks) + nbytes(cache.v_tail)
    assert acc.block_tokens == pi
    assert acc.sequence_bytes(pi + 1) == 2 * acc.block + acc.tail_per_sequence
    assert acc.amortized_per_token(1000) == pytest.approx(acc.per_token + acc.tail_per_sequence / 1000)


def test_hack2_smollm2_figures():
    """SmolLM2 shapes (Hkv=3, D=64), pi=64, 2 bits: 96 B of codes + 3 x 12 B of scale/min/sum per token."""
    acc = kv_bytes("hack2", 3, 64)
    assert (acc.codes / 64, acc.scales / 64, acc.minima / 64, acc.sums / 64) == (96, 12, 12, 12)
    assert acc.per_token == 132 and acc.tail_per_sequence == 3 * 64 * 64 * 2
    assert kv_bytes("bfloat16", 3, 64).per_token / acc.per_token == pytest.approx(768 / 132)


@pytest.mark.parametrize("kwargs", [dict(bits=3), dict(pi=48), dict(pi=256), dict(tail_dtype=torch.float32)])
def test_bad_hack_format(kwargs):
    with pytest.raises(ConfigError):
        HackFormat(**kwargs)


def test_bad_format_and_head_dim():
    with pytest.raises(ConfigError, match="unknown KV format"):
        parse_format("int3")
    with pytest.raises(ConfigError, match="head_dim 80"):
        kv_bytes("hack2", 2, 80)
