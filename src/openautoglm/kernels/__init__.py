"""Native CPU kernels that torch's CPU ops lack, written in C and compiled at first use.

- ``dequant_int4_bf16``: int4 per-group weights (the portable layout of ``quant/primitives.py``) to bf16, bit for
  bit the torch reference (``w = (q - 8) * s + z`` in fp32, rounded to nearest even). O3 uses it for prefill:
  one dequantization per call, then oneDNN's bf16 GEMM (AMX where the CPU has it), instead of the int4 kernel,
  which re-expands the weights for every block of tokens; no bf16 copy of the weights is kept.

The C source ships with the package and is compiled by the system C compiler (``$CC``, else ``cc``/``gcc``: the
one AOTInductor needs anyway) into ``~/.cache/openautoglm/kernels``, keyed by the source and the compiler, and
written atomically. The code picks AVX-512 / AVX2 / scalar at run time, so the library is not tied to the CPU it
was built on. Calls go through ctypes on one thread: splitting a call over a second thread was slower here
(2 cores; torch's OpenMP workers spin between regions), and the kernel (~3 G weights/s a core with AVX-512) is
small next to the GEMM it feeds. Where no compiler works, ``available()`` is False and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("dequant.c")
_CFLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c11"]


def _compiler() -> str | None:
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        return None
    from ..compiler import cache_root

    src = _SRC.read_bytes()
    key = hashlib.sha256(src + cc.encode() + " ".join(_CFLAGS).encode()).hexdigest()[:16]
    path = cache_root() / "kernels" / f"dequant-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            subprocess.run([cc, *_CFLAGS, str(_SRC), "-o", str(tmp)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)
        except (OSError, subprocess.SubprocessError):
            tmp.unlink(missing_ok=True)
            return None
    lib = ctypes.CDLL(str(path))
    lib.oag_dequant_int4_path.argtypes = [ctypes.c_int64]
    lib.oag_dequant_int4_path.restype = ctypes.c_int
    lib.oag_dequant_int4_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.oag_dequant_int4_bf16.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def dequant_path(group_size: int) -> str:
    """The code path this CPU takes for ``group_size``: 'avx512', 'avx2' or 'scalar' ('' without the library)."""
    lib = _library()
    return "" if lib is None else ("scalar", "avx2", "avx512")[lib.oag_dequant_int4_path(group_size)]


def dequant_int4_bf16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      out: torch.Tensor | None = None, path: int | None = None) -> torch.Tensor:
    """(N, K/2) uint8 codes, (N, K/g) bf16 scales and zeros -> (N, K) bf16 weights, written into ``out`` when
    given (a reused buffer spares the page faults of a fresh allocation on every call). ``path`` forces a code
    path (tests compare every path with the reference)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (no working C compiler)")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dtype != torch.uint8 or scales.dtype != torch.bfloat16 or zeros.dtype != torch.bfloat16:
        raise TypeError("dequant_int4_bf16 takes uint8 codes and bf16 scales/zeros")
    if k % group_size or group_size % 2 or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"shapes do not match: codes {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"group size {group_size}")
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if out is None:
        out = torch.empty(n, k, dtype=torch.bfloat16)
    elif out.shape != (n, k) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n}, {k}) bf16 tensor")
    best = lib.oag_dequant_int4_path(group_size)
    if path is None:
        path = best
    elif not 0 <= path <= best:
        raise ValueError(f"code path {path} is not available on this CPU for group size {group_size}")
    lib.oag_dequant_int4_bf16(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), 0, n, k,
                              group_size, path)
    return out
