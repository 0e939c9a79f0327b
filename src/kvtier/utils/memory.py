"""Large host buffers backed by transparent huge pages where the OS offers them.

KV blocks are read in scattered 4 KiB-sized pieces; with 4 KiB pages every block costs a TLB miss.
Asking for huge pages before the buffer is first touched lets the kernel back it with 2 MiB pages
(Linux, THP in "madvise" or "always" mode); elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import torch

MADV_HUGEPAGE = 14
PAGE = 4096


@cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def advise_hugepages(t: torch.Tensor) -> bool:
    """Ask for huge pages under a CPU tensor's storage; True if the OS accepted."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() == 0:
        return False
    start = -(-t.data_ptr() // PAGE) * PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // PAGE * PAGE
    if end <= start:
        return False
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


def empty_hugepage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` whose pages (CPU) are huge pages where possible; untouched until written."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_hugepages(t)
    return t
