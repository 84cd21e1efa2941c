"""The default level ("auto"): O3 without the wait.

O3's first start on a machine tunes kernels and compiles decode packages for minutes. "auto" never makes a user
wait for that: when this machine has already built O3 for the model (a marker written after every successful O3
compile), the model is compiled at O3 at once (the packages and kernel choices load from the cache); otherwise it
runs at O1 right away while a separate, lower-priority process (``openautoglm compile``) builds the O3 cache, and
the engine switches to O3 at the first generation that starts after the build is done. A process that exits
first (``openautoglm run``) leaves the build running, so the next start is warm.

The marker's key is what the packages depend on: the model file (path, size, modification time), the level, the
planned batch and length, how GGUF tensors are loaded, this CPU, torch and our sources. Losing it only costs a
rebuild. ``OPENAUTOGLM_BACKGROUND_BUILD=0`` turns the background build off (the engine then stays at O1).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..host import atomic_write_text, cache_root, cpu_key


def enabled() -> bool:
    return os.environ.get("OPENAUTOGLM_BACKGROUND_BUILD", "1").lower() not in ("0", "false", "no", "off")


def build_key(model_path: str | Path, level: str, max_batch: int, max_len: int, gguf_weights: str,
              kv_dtype: str = "auto", dtype: str = "fp32") -> str:
    import torch

    from .. import kernels
    from .aot import _sources_digest

    p = Path(model_path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.glob("*") if f.is_file())
    ident = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    # (not the thread count: O3 tunes it, and its kernel choices are cached by the count a process starts with)
    blob = json.dumps([ident, level, max_batch, max_len, gguf_weights, kv_dtype, dtype, cpu_key(), torch.__version__,
                       kernels.sources_digest(), _sources_digest()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _dir() -> Path:
    return cache_root() / "builds"


def marker(key: str) -> Path:
    return _dir() / f"{key}.done"


def is_warm(key: str) -> bool:
    return marker(key).is_file()


def mark_warm(key: str, info: dict) -> None:
    atomic_write_text(marker(key), json.dumps(info))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


@dataclass
class Build:
    """A background O3 build of one model (this process's child, or one another process started)."""

    key: str
    pid: int
    log: Path
    proc: subprocess.Popen | None = None

    def done(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return not _alive(self.pid)

    def ok(self) -> bool:
        return self.done() and is_warm(self.key)


def start(key: str, model_path: str | Path, level: str, max_batch: int, max_len: int, gguf_weights: str,
          kv_dtype: str = "auto", dtype: str = "fp32") -> Build:
    """Start (or join, when one is already running for ``key``) the background build; returns it."""
    d = _dir()
    d.mkdir(parents=True, exist_ok=True)
    pidfile, log = d / f"{key}.pid", d / f"{key}.log"
    try:
        pid = int(pidfile.read_text())
        if _alive(pid):
            return Build(key, pid, log)
    except (OSError, ValueError):
        pass
    cmd = [sys.executable, "-m", "openautoglm.cli", "compile", "-m", str(model_path), "--opt", level,
           "--max-batch", str(max_batch), "--max-len", str(max_len), "--gguf-weights", gguf_weights,
           "--kv-dtype", kv_dtype, "--dtype", dtype,
           "--threads", str(_threads()), "-q"]
    with open(log, "wb") as f:
        from .autotune import BACKGROUND_ENV

        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, BACKGROUND_ENV: "1"},  # (no thread timing beside the engine)
                                start_new_session=True, preexec_fn=lambda: os.nice(10))  # survives its parent
    atomic_write_text(pidfile, str(proc.pid))
    return Build(key, proc.pid, log, proc)


def _threads() -> int:
    import torch

    return torch.get_num_threads()
