"""User-facing errors: one line that names the problem and the fix.

Anything raised as a ``KvtierError`` is shown by the CLI and the server without a traceback.
"""

from __future__ import annotations


class KvtierError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}; {fix}")


class ModelLoadError(KvtierError):
    """The model path, file or architecture cannot be used."""


class ConfigError(KvtierError):
    """An engine option is out of range or inconsistent."""


class RequestError(KvtierError):
    """A request cannot be served as asked (prompt too long, bad sampling parameters...)."""
