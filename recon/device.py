"""Choosing the compute device once: CUDA when present, else CPU; an explicit choice overrides."""

from __future__ import annotations

import torch


def choose_device(requested: str | torch.device | None = None) -> torch.device:
    """Return ``requested`` if given ("cpu", "cuda", "cuda:1", "auto"/None → CUDA if available, else CPU).

    Raises ValueError when CUDA is asked for explicitly but is not available.
    """
    if requested is None or str(requested).lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but CUDA is not available on this machine")
    return device


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -3, -4, -8
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest accepted mmap threshold on 64-bit
_allocator_tuned = False


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed blocks in one heap for reuse instead of returning them to the kernel.

    PyTorch's CPU allocator does not cache, and glibc serves blocks above its mmap threshold with fresh ``mmap``
    pages, so every FISTA iteration would page-fault its code-sized buffers in again. The threshold cannot be
    raised above 32 MiB, and a batch of 256², K = 32 codes is about 50 MiB per buffer, so ``mmap`` is switched off
    altogether (``M_MMAP_MAX`` = 0: every block comes from the heap) and the heap is never trimmed below 4 GiB.

    Every thread shares that one heap (``M_ARENA_MAX`` = 1). glibc otherwise gives each thread that allocates while
    another holds the lock an arena of its own (up to 8 per core), and with trimming off each arena keeps the
    largest working set its threads ever had: a warm server whose scans run on a new thread per connection then
    holds one scan's peak per arena (measured: 1.9 GiB after 8 concurrent 128², 4-coil scans, against 0.6 GiB with
    one arena). With one heap the process holds the largest working set of the scans that ran *at the same time*,
    which :mod:`gadgets.memory_budget` bounds. Call this before starting threads (an arena a thread already has
    stays in use). The in-process form of ``MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=…``.
    Returns whether it took effect (glibc only; a no-op elsewhere)."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = (mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, 4 * 2**30) == 1
          and mallopt(_M_TOP_PAD, 64 * 2**20) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_ARENA_MAX, 1) == 1)
    _allocator_tuned = ok
    return ok
