import pytest
import torch

from kvtier.config import EngineConfig


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
