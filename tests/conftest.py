import pytest
import torch

from kvtier.config import EngineConfig

# The suite asserts the CPU engine's behaviour (float32, HF parity, bit-exact policies, the compiled kernels).
# On a GPU machine ``device="auto"`` would pick CUDA and bfloat16, so here it means the CPU; the tests marked
# gpu (tests/test_cuda.py) ask for ``device="cuda"`` themselves.
_torch_device = EngineConfig.torch_device
EngineConfig.torch_device = lambda self: torch.device("cpu") if self.device == "auto" else _torch_device(self)


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once for the session."""
    from kvtier import LLM

    return LLM(model="default")


@pytest.fixture(scope="session")
def default_loaded(default_llm):
    return default_llm.engine.loaded


def tiny_config(**kw) -> EngineConfig:
    """A two-layer random llama: exercises the engine's plumbing in milliseconds."""
    base = dict(model="tiny-llama", load_format="dummy", max_model_len=512)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(params=["ext", "reference"])
def kernel_path(request, monkeypatch):
    """Run a test on the compiled kernels and on the pure-torch reference path."""
    from kvtier.kernels import ext

    if request.param == "reference":
        monkeypatch.setattr(ext, "load", lambda *args, **kwargs: None)
    elif ext.load() is None:
        pytest.skip("compiled kernels unavailable here")
    return request.param


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
