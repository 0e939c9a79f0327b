"""Comma-separated choices from the command line (``--policies static,online``), checked."""

from __future__ import annotations

from collections.abc import Collection

from kvtier.errors import ConfigError


def comma_choices(text: str, known: Collection[str], what: str, option: str = "") -> list[str]:
    """The names in ``text``; a name not in ``known`` (or none at all) is a ConfigError naming them."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        where = f" in {option}" if option else ""
        raise ConfigError(f"unknown {what} '{', '.join(bad) or text}'{where}",
                          f"use one or more of: {', '.join(known)} (comma-separated)")
    return names
