"""Real English text that ships with every CPython (no download at run time): the help topics of
the Python Language Reference in ``pydoc_data.topics`` (Debian: libpython3.X-stdlib), about 460 K
characters of prose with some code, in a fixed order."""

from __future__ import annotations

from functools import lru_cache

from kvtier.errors import ConfigError

SOURCE = "CPython pydoc_data.topics (the Python Language Reference help topics)"


@lru_cache(maxsize=1)
def reference_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split it out
        raise ConfigError("this Python has no pydoc_data module (the evaluation text)",
                          "install your distribution's full Python standard library") from e
    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def english_tokens(tokenizer, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of the reference text."""
    ids = tokenizer.encode(reference_text()[: num_tokens * 8])
    if len(ids) < num_tokens:
        raise ConfigError(f"the evaluation text has only {len(ids)} tokens", f"ask for at most {len(ids)}")
    return ids[:num_tokens]
