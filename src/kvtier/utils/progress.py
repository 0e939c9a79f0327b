"""Progress bars (rich) on stderr; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def _console():
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    from rich.progress import track

    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    yield from track(items, description=description, total=total, console=_console(),
                     disable=not sys.stderr.isatty(), transient=True)


@contextmanager
def progress_counter(description: str, total: int, enabled: bool = True):
    """A bar advanced by hand: ``with progress_counter("x", 10) as advance: advance()``."""
    from rich.progress import Progress

    with Progress(console=_console(), disable=not (enabled and sys.stderr.isatty()), transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
