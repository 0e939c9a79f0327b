"""kvtier's compiled CPU kernels: built from ``csrc/`` on first use and cached in the user cache dir.

The build needs a C++ compiler (gcc/clang) and ninja, both checked for; where they are missing or
the build fails, ``load()`` returns None once with a warning and callers use the pure-torch
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

SOURCES = [Path(__file__).resolve().parent.parent / "csrc" / "cpu_kernels.cpp"]
# no -march=native: the instruction set is chosen at load time (target_clones in the sources);
# no -ffast-math: masking with -inf must keep working; -fno-trapping-math lets min/max vectorize
CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def build_name() -> str:
    """Name of the build: sources, torch and Python versions, machine type."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}".encode())
    return f"kvtier_cpu_{h.hexdigest()[:12]}"


def _toolchain_missing() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler found (install g++)"
    return None


@cache
def load(verbose: bool = False):
    """The compiled module, or None (with one warning) if it cannot be built here."""
    if os.environ.get("KVTIER_NO_EXT") == "1":
        return None
    missing = _toolchain_missing()
    if missing:
        warnings.warn(f"kvtier: using reference kernels: {missing}", stacklevel=2)
        return None
    from torch.utils.cpp_extension import load as build

    build_dir = cache_dir("kernels", build_name())
    try:
        return build(name=build_name(), sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
                     extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=verbose)
    except Exception as e:  # compiler errors arrive as RuntimeError/CalledProcessError/ImportError
        warnings.warn(f"kvtier: using reference kernels: building {build_name()} failed: "
                      f"{str(e).splitlines()[0]}", stacklevel=2)
        return None


if __name__ == "__main__":  # python -m kvtier.kernels.ext: build ahead of time
    print("kvtier kernels:", "ready" if load(verbose=True) is not None else "unavailable (reference path)")
