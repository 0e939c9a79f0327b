"""``python -m kvtier.kernels``: build every compiled kernel module ahead of time (``make setup``)."""

from kvtier.kernels import ext

for module in ext.modules():
    ok = ext.load(module, verbose=True) is not None
    print(f"kvtier kernels {module}:", "ready" if ok else "unavailable (reference path)")
