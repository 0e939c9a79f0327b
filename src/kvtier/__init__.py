"""kvtier: memory-hierarchy-aware LLM inference over a paged KV cache."""

from kvtier.entrypoints.llm import LLM
from kvtier.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
