"""Ground-floor plumbing that several layers share: the user cache directory, a key for this CPU's features,
and atomic file writes. It imports nothing of the package, so compiler, kernels, quant and bench can all use it
without importing each other."""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """The user cache: ``$OPENAUTOGLM_CACHE``, else ``~/.cache/openautoglm`` (compile packages, kernels,
    autotune choices, sensitivities). Losing it only costs time."""
    return Path(os.environ.get("OPENAUTOGLM_CACHE", Path.home() / ".cache" / "openautoglm"))


def _flags_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where it is not there)."""
    return frozenset(_flags_line().partition(":")[2].split())


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): where bf16 GEMMs beat fp32 ones. On CPUs
    without it (AVX2 only), a bf16 GEMM runs 5-8x slower than an fp32 one."""
    f = cpu_flags()
    return "avx512_bf16" in f or "amx_bf16" in f


def cpu_key() -> str:
    """A short digest of this CPU's feature flags: what is compiled or tuned for one CPU is keyed by it."""
    return hashlib.sha256(_flags_line().encode()).hexdigest()[:12]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same directory, this process's own name, same suffix) to write to; it
    replaces ``path`` when the block succeeds and is removed when it fails, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # blocks up to 32 MB (glibc's largest threshold) come from the heap, and its top is never trimmed
    _KEPT = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) & bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEPT
