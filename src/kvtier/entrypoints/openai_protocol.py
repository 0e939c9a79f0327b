"""The OpenAI wire format: request models (validated, strict types), response and chunk models, errors.

Requests ignore fields they do not know (clients send many); fields kvtier cannot honour
(logprobs, penalties, logit_bias, tools, echo, suffix, batched prompts) are a 400 that names them,
never silently dropped. vLLM's extra sampling fields (top_k, min_p, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens) are accepted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvtier.engine.outputs import RequestOutput
from kvtier.errors import RequestError
from kvtier.sampling_params import SamplingParams

MAX_N = 16


class APIRequestError(RequestError):
    """A request error with its HTTP status and OpenAI error fields."""

    def __init__(self, problem: str, fix: str | None = None, *, status: int = 400, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(problem, fix)
        assert 400 <= status < 600
        self.status, self.param, self.code, self.type = status, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- requests ---------------------------------------------------------------------------------

class OpenAIModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingRequest(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the first served name
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> dict[str, str]:
        """param -> why it cannot be served; empty when everything asked for is supported."""
        out = {}
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                out[name] = f"{name} is not supported (only 0)"
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = "repetition_penalty is not supported (only 1)"
        if self.logit_bias:
            out["logit_bias"] = "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            out["stream_options"] = "stream_options is only allowed with stream=true"
        return out

    def check_supported(self) -> None:
        for param, problem in self.unsupported().items():
            raise APIRequestError(problem, f"drop '{param}' from the request", param=param)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, stop=self.stop, stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, n=self.n,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> dict[str, str]:
        out = super().unsupported()
        if self.echo:
            out["echo"] = "echo is not supported"
        if self.logprobs is not None:
            out["logprobs"] = "logprobs are not supported"
        if self.suffix:
            out["suffix"] = "suffix (insertion) is not supported"
        if self.best_of is not None and self.best_of != self.n:
            out["best_of"] = "best_of other than n is not supported"
        return out

    def single_prompt(self) -> tuple[str | None, list[int] | None]:
        """(text, token ids) of the one prompt; batched prompts are a 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIRequestError(f"got {len(p)} prompts in one request; batched prompts are not supported",
                                      "send one request per prompt", param="prompt")
            p = p[0]
        return (p, None) if isinstance(p, str) else (None, list(p))


class TextPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict:
        content = self.content or ""
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise APIRequestError("only text content parts are supported", "send {'type': 'text', 'text': ...}",
                                      param="messages")
            content = "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> dict[str, str]:
        out = super().unsupported()
        if self.logprobs or self.top_logprobs:
            out["logprobs"] = "logprobs are not supported"
        if self.tools:
            out["tools"] = "tools (function calling) are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            out["response_format"] = "only response_format type 'text' is supported"
        return out


# ---- responses --------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": ...}; {} with the finish reason
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvtier"
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# ---- engine outputs -> responses --------------------------------------------------------------

@dataclass(slots=True)
class ReplyContext:
    """What every response and chunk of one request repeats."""

    id: str
    model: str
    n: int = 1
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


Piece = tuple[int, str, "str | None", "int | str | None"]  # (choice index, new text, finish reason, stop reason)


def usage_of(out: RequestOutput) -> Usage:
    return Usage.of(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))


def completion_response(ctx: ReplyContext, out: RequestOutput) -> CompletionResponse:
    choices = [CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in out.outputs]
    return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage_of(out))


def chat_response(ctx: ReplyContext, out: RequestOutput) -> ChatCompletionResponse:
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                          stop_reason=c.stop_reason) for c in out.outputs]
    return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices,
                                  usage=usage_of(out))


def completion_chunk(ctx: ReplyContext, pieces: list[Piece]) -> CompletionChunk:
    choices = [CompletionChoice(index=i, text=text, finish_reason=fin, stop_reason=stop)
               for i, text, fin, stop in pieces]
    return CompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices)


def chat_chunk(ctx: ReplyContext, pieces: list[Piece]) -> ChatCompletionChunk:
    choices = [ChatChunkChoice(index=i, delta={"content": text} if text else {}, finish_reason=fin)
               for i, text, fin, _ in pieces]
    return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices)


def chat_role_chunk(ctx: ReplyContext) -> ChatCompletionChunk:
    choices = [ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(ctx.n)]
    return ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices)


def usage_chunk(ctx: ReplyContext, out: RequestOutput, chat: bool) -> BaseModel:
    cls = ChatCompletionChunk if chat else CompletionChunk
    return cls(id=ctx.id, created=ctx.created, model=ctx.model, choices=[], usage=usage_of(out))
