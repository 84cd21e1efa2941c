"""Process memory housekeeping."""

from __future__ import annotations


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them in its arenas after large frees (per-thread arenas
    above all), so a model that was quantized or packed would otherwise keep its temporaries' resident size.
    A no-op where libc has no ``malloc_trim``."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
