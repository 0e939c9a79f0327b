"""What the engine hands back per request (vLLM's RequestOutput shape, plus timing stats)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass(slots=True)
class RequestStats:
    num_prompt_tokens: int
    num_output_tokens: int
    ttft_s: float | None  # arrival to first output token
    e2e_s: float | None  # arrival to finish
    decode_s: float | None  # first to last output token
    num_preemptions: int

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.decode_s is None or self.num_output_tokens < 2:
            return None
        return self.decode_s / (self.num_output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        t = self.tpot_s
        return None if not t else 1.0 / t

    def as_dict(self) -> dict:
        return {
            "num_prompt_tokens": self.num_prompt_tokens, "num_output_tokens": self.num_output_tokens,
            "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
            "decode_tokens_per_s": self.decode_tokens_per_s, "num_preemptions": self.num_preemptions,
        }


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    stats: list[RequestStats] = field(default_factory=list)  # one per completion

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
