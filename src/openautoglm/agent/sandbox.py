"""Run untrusted Python in a separate, confined process (the agent's ``python`` tool).

Isolation is the kernel's, through sandlock (Landlock for the file system and TCP, seccomp for the rest):

- the file system: the code may read the Python installation's standard library and the shared libraries it
  loads, and read/write one fresh temporary work directory (its cwd); nothing else (``/etc/shadow``, ``~/.ssh``,
  ``/proc``, the project, other work dirs). A symlink out of the work dir is followed by the kernel and
  refused the same way;
- no network: every socket connect/bind is denied;
- no child processes (``max_processes``): no shell, no fork bomb;
- memory (``max_memory``, the process is killed past it), CPU seconds (RLIMIT_CPU) and wall-clock
  (``timeout``, enforced by the supervising process, which the code cannot reach);
- a clean environment: none of the server's variables (API keys), no HOME, Python in isolated mode (-I).

These machines run as root, and resource limits alone do not stop root; Landlock and seccomp do (a
root-owned process under Landlock still cannot open what the ruleset does not grant). Where Landlock is not
available, :class:`PythonSandbox` refuses to run (``SandboxUnavailableError``) unless built with
``unsafe=True`` (``--unsafe-python``), which runs the code in a plain subprocess with the same limits but no
confinement.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import OpenAutoGLMError


class SandboxUnavailableError(OpenAutoGLMError):
    """The OS isolation the python tool needs is not available here."""


@dataclass
class RunResult:
    ok: bool
    stdout: str
    stderr: str
    exit_code: int
    reason: str  # "ok" | "error" | "timeout" | "cpu" | "memory"
    seconds: float

    def observation(self, limit: int = 4000) -> str:
        """What the model sees: output, and the error or limit that ended the run."""
        parts = []
        if self.stdout:
            parts.append(self.stdout[-limit:])
        if self.reason == "timeout":
            parts.append(f"[stopped: the code ran past the {self.seconds:.0f} s time limit]")
        elif self.reason == "cpu":
            parts.append("[stopped: the code ran past its CPU time limit]")
        elif self.reason == "memory":
            parts.append("[stopped: the code went past the memory limit]")
        elif not self.ok:
            parts.append(self.stderr[-limit:] or f"[exited with code {self.exit_code}]")
        return "\n".join(parts) if parts else "[no output]"


# In the child: the CPU limit, then main.py run as a notebook cell would be: a last bare expression is printed.
_PRELUDE = (
    "import resource as _r; _r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu})); del _r\n"
    "import ast as _a, sys as _s\n"
    "try:\n"
    "    _t = _a.parse(open('main.py').read(), 'main.py')\n"
    "except SyntaxError as _e:\n"
    "    import traceback as _tb; _s.stderr.write(''.join(_tb.format_exception_only(_e))); _s.exit(1)\n"
    "_g = {{'__name__': '__main__'}}\n"
    "_last = _t.body.pop() if _t.body and isinstance(_t.body[-1], _a.Expr) else None\n"
    "exec(compile(_t, 'main.py', 'exec'), _g)\n"
    "if _last is not None:\n"
    "    _v = eval(compile(_a.Expression(_last.value), 'main.py', 'eval'), _g)\n"
    "    if _v is not None: print(repr(_v))\n"
)


def isolation_available() -> str | None:
    """None when Landlock and sandlock are usable here, else why not."""
    try:
        import sandlock
    except ImportError:
        return "the sandlock package is not installed (pip install sandlock)"
    try:
        abi = sandlock.landlock_abi_version()
    except Exception as e:  # noqa: BLE001 - any failure to query means no confinement
        return f"Landlock is not available: {e}"
    if abi < sandlock.min_landlock_abi():
        return f"Landlock ABI {abi} is older than the {sandlock.min_landlock_abi()} sandlock needs"
    return None


def _readable() -> list[str]:
    """What the interpreter needs to start and import the standard library: its own files and the shared
    libraries (never a directory of executables other than its own binary's)."""
    paths = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"], os.path.realpath(sys.executable),
             "/lib", "/lib64", "/usr/lib", "/usr/lib64", "/etc/ld.so.cache", "/dev/null", "/dev/urandom"}
    dyn = sysconfig.get_config_var("DESTSHARED")
    if dyn:
        paths.add(dyn)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        paths.add(libdir)
    return sorted(p for p in paths if os.path.exists(p))


class PythonSandbox:
    """Runs code strings, each in a fresh work directory removed after; a last bare expression's value is
    printed, as in a notebook cell."""

    def __init__(self, timeout_s: float = 10.0, cpu_s: int = 10, memory_mb: int = 512, unsafe: bool = False,
                 files: list[str | Path] = ()):
        """``files``: copied into each run's work directory (data the code may read, e.g. the agent's database:
        a copy, so the original cannot be changed from inside)."""
        self.timeout_s, self.cpu_s, self.memory_mb, self.unsafe = timeout_s, cpu_s, memory_mb, unsafe
        self.files = [Path(f) for f in files]
        why = isolation_available()
        if why is not None and not unsafe:
            raise SandboxUnavailableError(
                f"the python tool needs OS isolation and {why}; pass --unsafe-python (unsafe=True) to run code "
                "without it, at your own risk")
        self.confined = why is None

    def run(self, code: str) -> RunResult:
        work = Path(tempfile.mkdtemp(prefix="oag-py-"))
        try:
            for f in self.files:
                shutil.copyfile(f, work / f.name)
            (work / "main.py").write_text(code)
            argv = [os.path.realpath(sys.executable), "-I", "-S", "-c", _PRELUDE.format(cpu=int(self.cpu_s))]
            t0 = time.monotonic()
            if self.confined:
                return self._confined(argv, work, t0)
            return self._plain(argv, work, t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _confined(self, argv, work: Path, t0: float) -> RunResult:
        import sandlock

        sb = sandlock.Sandbox(fs_writable=[str(work)], fs_readable=_readable(), clean_env=True,
                              env={"HOME": str(work), "PYTHONDONTWRITEBYTECODE": "1"},
                              max_memory=f"{int(self.memory_mb)}M", max_processes=1, cwd=str(work),
                              no_coredump=True)
        r = sb.run(argv, timeout=self.timeout_s)
        secs = time.monotonic() - t0
        out = (r.stdout or b"").decode("utf-8", "replace")
        err = (r.stderr or b"").decode("utf-8", "replace")
        why = getattr(getattr(r, "reason", None), "name", "")
        if r.success:
            reason = "ok"
        elif why == "TIMEOUT":
            reason = "timeout"
        elif why == "KILLED":  # by the kernel: past RLIMIT_CPU, or past the memory limit (sooner)
            reason = "cpu" if secs >= 0.9 * self.cpu_s else "memory"
        else:
            reason = "error"
        return RunResult(bool(r.success), out, err, int(r.exit_code), reason, secs)

    def _plain(self, argv, work: Path, t0: float) -> RunResult:
        def limits():
            import resource

            mem = int(self.memory_mb) << 20
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_CPU, (int(self.cpu_s), int(self.cpu_s)))

        env = {"HOME": str(work), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            p = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=self.timeout_s,
                               preexec_fn=limits)
        except subprocess.TimeoutExpired as e:
            return RunResult(False, (e.stdout or b"").decode("utf-8", "replace"), "", -9, "timeout",
                             time.monotonic() - t0)
        err = p.stderr.decode("utf-8", "replace")
        reason = "ok" if p.returncode == 0 else ("memory" if "MemoryError" in err else "error")
        return RunResult(p.returncode == 0, p.stdout.decode("utf-8", "replace"), err, p.returncode, reason,
                         time.monotonic() - t0)
