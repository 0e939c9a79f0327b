"""Engine options: the same names in the Python API, the CLI (as --kebab-case) and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier.errors import ConfigError
from kvtier.kernels.formats import HACK_FORMATS, HackFormat, parse_format
from kvtier.kernels.qlinear import WEIGHT_FORMATS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_DTYPES = [*DTYPES, *HACK_FORMATS]


@dataclass(slots=True)
class EngineConfig:
    model: str = "default"  # "default", an HF folder, a .gguf file, or a named shape with load_format="dummy"
    load_format: str = "auto"  # "auto" | "dummy" (random weights)
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    weights: str = "float32"  # weight format of the linear layers: float32 (in dtype) | bfloat16 | int8 | int4
    kv_dtype: str = "auto"  # KV cache format: "auto" (the model's dtype) | float32 | bfloat16 | float16 | hack2/4/8
    device: str = "auto"  # "auto" | "cpu" | "cuda[:N]"
    max_model_len: int | None = None  # default: the model's context length
    block_size: int | None = None  # tokens per KV block (default 16; a HACK cache's blocks are its partitions)
    kv_cache_memory: str | int = "auto"  # bytes for the KV pool, e.g. "2GiB"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory
    kv_policy: str = "plain"
    kv_policy_options: dict = field(default_factory=dict)
    kv_tiers: str | dict | None = None  # budgets per memory tier: "device=2GiB,host=16GiB,disk=64GiB"
    kv_disk_dir: str | None = None  # directory of the disk tier's memory-mapped file
    kv_trace: str | None = None  # write the attention mass per block, layer and KV head to this file
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    enable_chunked_prefill: bool = True
    seed: int = 0
    hf_overrides: dict = field(default_factory=dict)
    num_threads: int | None = None  # CPU threads for torch (default: torch's choice)

    def __post_init__(self):
        at_least = [("block_size", 1), ("max_num_seqs", 1), ("max_num_batched_tokens", 1),
                    ("max_model_len", 2), ("num_kv_blocks", 1)]
        for name, low in at_least:
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}'", f"use auto or one of {', '.join(DTYPES)}")
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"unknown KV dtype '{self.kv_dtype}'", f"use auto or one of {', '.join(KV_DTYPES)}")
        self.block_size = self._block_size()
        if self.weights not in WEIGHT_FORMATS:
            raise ConfigError(f"unknown weight format '{self.weights}'", f"use one of {', '.join(WEIGHT_FORMATS)}")

    def _block_size(self) -> int:
        hack = self.kv_format()
        if hack is None:
            return 16 if self.block_size is None else self.block_size
        if self.block_size not in (None, hack.pi):
            raise ConfigError(f"a {hack.name} KV cache has blocks of {hack.pi} tokens (one V partition each), "
                              f"not {self.block_size}", f"drop --block-size or pass --block-size {hack.pi}")
        return hack.pi

    def kv_format(self) -> HackFormat | None:
        """The HACK format of the KV cache, or None for a float cache."""
        return parse_format(self.kv_dtype) if self.kv_dtype in HACK_FORMATS else None

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"unknown device '{self.device}'", "use auto, cpu or cuda[:N]") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but no CUDA GPU is available", "use --device cpu")
        return dev

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The float dtype K/V are stored in (a HACK cache takes the model's and quantizes it)."""
        return DTYPES.get(self.kv_dtype, model_dtype)
