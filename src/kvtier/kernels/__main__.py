"""``python -m kvtier.kernels``: build every compiled kernel module ahead of time (``make setup``).

Each module is one C++ source and one compiler process, so the modules build side by side, one per
core (serially the four took 86 s on a 2-core machine)."""

import os
from concurrent.futures import ProcessPoolExecutor

from kvtier.kernels import ext


def _build(module: str) -> bool:
    return ext.load(module) is not None


if __name__ == "__main__":
    modules = ext.modules()
    with ProcessPoolExecutor(max_workers=max(1, min(len(modules), os.cpu_count() or 1))) as pool:
        for module, ok in zip(modules, pool.map(_build, modules), strict=True):
            print(f"kvtier kernels {module}:", "ready" if ok else "unavailable (reference path)")
