"""Text in and out: a transformers tokenizer, its chat template, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

from kvtier.errors import ModelLoadError, RequestError


class Tokenizer:
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}",
                                 "the folder needs tokenizer.json or tokenizer_config.json") from e
        self.vocab_size = len(self.hf)
        self.has_chat_template = bool(getattr(self.hf, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise RequestError("this model's tokenizer has no chat template",
                               "send plain prompts (kvtier generate / /v1/completions)")
        if not messages:
            raise RequestError("messages is empty", "send at least one message")
        ids = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                          return_dict=False)
        return list(ids)


class IncrementalDetokenizer:
    """Text of a growing token list, released piece by piece once it is stable.

    Decoding a window that starts a few tokens back keeps merges and leading spaces right; a piece
    that ends in an incomplete UTF-8 character waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def step(self, ids: list[int]) -> str:
        """Feed all output ids so far; return the new text (maybe empty)."""
        prefix = self.tok.decode(ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += delta
        return delta

    def flush(self, ids: list[int]) -> str:
        """At the end: whatever is still held back, replacement characters included."""
        prefix = self.tok.decode(ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(ids[self.prefix_offset:], self.skip)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(ids)
        self.text += delta
        return delta
