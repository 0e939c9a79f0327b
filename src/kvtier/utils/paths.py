"""Where kvtier keeps converted weights and other caches."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """The user cache dir (``$KVTIER_CACHE_DIR`` or the platform's, e.g. ``~/.cache/kvtier``)."""
    root = os.environ.get("KVTIER_CACHE_DIR") or platformdirs.user_cache_dir("kvtier", appauthor=False)
    path = Path(root).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
