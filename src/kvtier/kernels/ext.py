"""kvtier's compiled CPU kernels: each ``csrc/<name>.cpp`` is one module, built on first use and
cached in the user cache dir (``python -m kvtier.kernels`` builds them all ahead of time).

The build needs a C++ compiler (gcc/clang) and ninja, both checked for; where they are missing or
the build fails, ``load(name)`` returns None once with a warning and callers use the pure-torch
reference path. ``KVTIER_NO_EXT=1`` forces the reference path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from functools import cache
from pathlib import Path

import torch

from kvtier.utils.paths import cache_dir

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# no -march=native: the instruction set is chosen at load time (target_clones in the sources);
# no -ffast-math: masking with -inf must keep working; -fno-trapping-math lets min/max vectorize
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def modules() -> list[str]:
    return sorted(p.stem for p in CSRC.glob("*.cpp"))


def build_name(module: str) -> str:
    """Name of a build: its source and the shared headers, torch and Python versions, machine type."""
    h = hashlib.sha256((CSRC / f"{module}.cpp").read_bytes())
    for header in sorted(CSRC.glob("*.h")):
        h.update(header.read_bytes())
    h.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}".encode())
    return f"kvtier_{module}_{h.hexdigest()[:12]}"


def _toolchain_missing() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found (install g++)"
    return None


@cache
def load(module: str = "cpu_kernels", verbose: bool = False):
    """The compiled ``csrc/<module>.cpp``, or None (with one warning) if it cannot be built here."""
    if os.environ.get("KVTIER_NO_EXT") == "1":
        return None
    missing = _toolchain_missing()
    if missing:
        warnings.warn(f"kvtier: using reference kernels: {missing}", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load as build

    name = build_name(module)
    try:
        return build(name=name, sources=[str(CSRC / f"{module}.cpp")], build_directory=str(cache_dir("kernels", name)),
                     extra_cflags=CFLAGS, extra_include_paths=[str(CSRC)], extra_ldflags=["-fopenmp"],
                     verbose=verbose)
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError/ImportError
        warnings.warn(f"kvtier: using reference kernels for {module}: building {name} failed: "
                      f"{str(e).splitlines()[0]}", stacklevel=2)
        return None

