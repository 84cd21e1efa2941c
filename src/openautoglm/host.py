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

