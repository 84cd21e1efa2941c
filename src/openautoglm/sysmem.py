"""Process memory housekeeping."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them in its arenas after large frees (per-thread arenas
    above all), so a model that was quantized or packed would otherwise keep its temporaries' resident size.
    A no-op where libc has no ``malloc_trim``."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEPT = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (once a process; a no-op elsewhere). By default it returns
    every large block to the kernel at free (mmap'd, or trimmed off the heap's top), so each prefill's activations
    and dequantized weights are mapped, faulted in and zeroed page by page anew: Qwen 1.5B, a 256-token prefill,
    ~800k page faults and 1.6 s of kernel time on a 1.2 s computation. llama.cpp plans its compute buffers once;
    this is torch's equivalent. The peak stays the same; memory freed after the peak is not handed back."""
    global _KEPT
    if _KEPT:
        return True
    try:
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # blocks up to 32 MB (glibc's largest threshold) come from the heap, and its top is never trimmed
    _KEPT = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEPT


_HUGE = 2 << 20  # x86-64's transparent huge page
_MADV_HUGEPAGE = 14


def empty_huge(nbytes: int, min_bytes: int = 4 << 20):
    """A new uint8 tensor of ``nbytes`` whose 2 MiB-aligned interior asks for transparent huge pages, advised
    before anything touches it (Linux; elsewhere, or under ``min_bytes``, a plain ``torch.empty``). With THP set
    to ``madvise`` (the common default) weights otherwise sit on 4 KiB pages, and a decode step that streams them
    pays a page walk every 4 KiB: Qwen 1.5B's Q4_K rows, one GEMV row on Zen 4, median 25 -> 28 GB/s."""
    import torch

    t = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes < min_bytes:
        return t
    a = t.data_ptr()
    lo, hi = (a + _HUGE - 1) & ~(_HUGE - 1), (a + nbytes) & ~(_HUGE - 1)
    if hi > lo:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: refused (EINVAL without THP) changes nothing
        except (OSError, AttributeError):
            pass
    return t
