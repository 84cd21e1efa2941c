"""The python tool's sandbox against escape attempts. Each attempt runs real code in the sandbox and then checks,
from outside, that the harm did not happen (the file is not written, the secret not printed, the socket not
connected, the machine still responsive), not merely that the code failed.

Where this machine has no Landlock, the tool must refuse to run at all (that refusal is the containment); the
attempts then run only under ``unsafe=True`` for the limits that hold without isolation (time, memory)."""

import socket
import threading
import time
from pathlib import Path

import pytest

from openautoglm.agent.sandbox import PythonSandbox, SandboxUnavailableError, isolation_available

CONFINED = isolation_available() is None
needs_isolation = pytest.mark.skipif(not CONFINED, reason=f"no OS isolation here: {isolation_available()}")


@pytest.fixture(scope="module")
def sb():
    return PythonSandbox(timeout_s=4, cpu_s=3, memory_mb=256)


def test_refuses_without_isolation_unless_unsafe():
    if CONFINED:
        assert PythonSandbox().confined
    else:
        with pytest.raises(SandboxUnavailableError, match="unsafe-python"):
            PythonSandbox()
    r = PythonSandbox(unsafe=True).run("print(6 * 7)")
    assert r.ok and r.stdout.strip() == "42"


@needs_isolation
def test_plain_code_runs_and_can_use_its_work_dir(sb):
    r = sb.run("open('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), sum(range(10)))")
    assert r.ok and r.stdout.split() == ["hi", "45"]


@pytest.fixture
def canary(tmp_path_factory):
    """A directory outside the sandbox with a secret in it."""
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.txt").write_text("CANARY-SECRET-7311")
    return d


@needs_isolation
@pytest.mark.parametrize("how", [
    "open({p!r} + '/new.txt', 'w').write('pwned')",
    "import os; os.makedirs({p!r} + '/sub', exist_ok=True); open({p!r} + '/sub/x', 'w').write('pwned')",
    "import shutil; shutil.copy('/dev/null', {p!r} + '/new.txt')",
    "import os; os.symlink({p!r}, 'link'); open('link/new.txt', 'w').write('pwned')",
    "import os; os.rename('main.py', {p!r} + '/new.txt')",
    "import os; os.remove({p!r} + '/secret.txt')",
    "import ctypes; libc = ctypes.CDLL(None); fd = libc.open(({p!r} + '/new.txt').encode(), 0o101, 0o644); "
    "libc.write(fd, b'pwned', 5)",
])
def test_cannot_write_or_delete_outside_its_work_dir(sb, canary, how):
    sb.run(how.format(p=str(canary)))
    assert sorted(x.name for x in canary.iterdir()) == ["secret.txt"]
    assert (canary / "secret.txt").read_text() == "CANARY-SECRET-7311"


@needs_isolation
@pytest.mark.parametrize("how", [
    "print(open({f!r}).read())",
    "import os; os.symlink({f!r}, 'l'); print(open('l').read())",
    "import os; os.link({f!r}, 'h'); print(open('h').read())",
    "import ctypes; libc = ctypes.CDLL(None); buf = ctypes.create_string_buffer(64); "
    "fd = libc.open({f!r}.encode(), 0); libc.read(fd, buf, 64); print(buf.value.decode())",
    "import subprocess; print(subprocess.run(['cat', {f!r}], capture_output=True).stdout.decode())",
])
def test_cannot_read_outside_files(sb, canary, how):
    r = sb.run(how.format(f=str(canary / "secret.txt")))
    assert "CANARY-SECRET" not in r.stdout + r.stderr


@needs_isolation
@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd", str(Path.home() / ".ssh"),
                                  str(Path.home()), "/proc/1/environ", "/proc/self/environ"])
def test_system_and_home_files_are_out_of_reach(sb, path):
    code = (f"import os\np = {path!r}\n"
            "print('LISTED', os.listdir(p)) if os.path.isdir(p) else print('READ', open(p, 'rb').read()[:50])")
    r = sb.run(code)
    assert "LISTED" not in r.stdout and "READ" not in r.stdout, r.stdout


@needs_isolation
def test_no_environment_of_the_server(sb, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-CANARY-ENV-5521")
    r = sb.run("import os; print(dict(os.environ)); print(open('/proc/self/environ', 'rb').read())")
    assert "CANARY-ENV" not in r.stdout + r.stderr


@needs_isolation
def test_no_network(sb):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(3)
    port = srv.getsockname()[1]
    hits = []

    def accept():
        try:
            c, _ = srv.accept()
            hits.append(c.recv(100))
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    sb.run(f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); s.sendall(b'leak')")
    sb.run("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
           f"s.sendto(b'leak', ('127.0.0.1', {port}))")
    r = sb.run("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print('LISTENING')")
    th.join()
    srv.close()
    assert hits == [] and "LISTENING" not in r.stdout


@needs_isolation
@pytest.mark.parametrize("code", [
    "import subprocess; print(subprocess.run(['sh', '-c', 'echo SHELL-RAN'], capture_output=True).stdout)",
    "import os; os.system('echo SHELL-RAN')",
    "import os; os.execv('/bin/sh', ['sh', '-c', 'echo SHELL-RAN'])",
    "import pty; pty.spawn(['/bin/sh', '-c', 'echo SHELL-RAN'])",
])
def test_cannot_spawn_a_shell(sb, code):
    r = sb.run(code)
    assert "SHELL-RAN" not in r.stdout.replace("'echo SHELL-RAN'", "")


@pytest.mark.slow  # seconds of a process at its limits
@needs_isolation
def test_fork_bomb_is_contained(sb):
    t0 = time.monotonic()
    r = sb.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert not r.ok and time.monotonic() - t0 < 10
    assert PythonSandbox(timeout_s=4).run("print('alive')").stdout.strip() == "alive"  # the machine is fine


@pytest.mark.slow  # each case runs to a limit
@pytest.mark.parametrize("code, reason", [
    ("while True: pass", {"timeout", "cpu"}),
    ("import time; time.sleep(60)", {"timeout"}),
    ("x = bytearray(8 * 1024 ** 3); print('ALLOCATED')", {"memory", "error"}),
    ("x = []\nwhile True: x.append(bytearray(64 << 20))", {"memory", "error"}),
])
def test_limits_stop_runaway_code(code, reason):
    sb = PythonSandbox(timeout_s=3, cpu_s=2, memory_mb=256, unsafe=not CONFINED)
    t0 = time.monotonic()
    r = sb.run(code)
    assert not r.ok and r.reason in reason, (r.reason, r.stderr[-300:])
    assert "ALLOCATED" not in r.stdout and time.monotonic() - t0 < 8
    assert r.observation().strip()


@needs_isolation
def test_cannot_signal_or_trace_processes_outside(sb):
    import subprocess

    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = sb.run(f"import ctypes, os; libc = ctypes.CDLL(None); print('PTRACE', libc.ptrace(16, {victim.pid}, 0, 0))"
                   f"\ntry:\n    os.kill({victim.pid}, 9)\nexcept OSError as e:\n    print('DENIED', e)")
        time.sleep(0.2)
        assert victim.poll() is None, "the sandbox killed a process outside it"
        assert "PTRACE 0" not in r.stdout
    finally:
        victim.kill()
        victim.wait()


@needs_isolation
def test_last_expression_is_printed_and_files_are_copies(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("original")
    sb = PythonSandbox(timeout_s=4, files=[data])
    assert sb.run("x = 6\nx * 7").stdout.strip() == "42"
    assert sb.run("print('a')\nNone").stdout.strip() == "a"
    r = sb.run("open('data.txt', 'a').write(' changed'); open('data.txt').read()")
    assert r.stdout.strip() == "'original changed'" and data.read_text() == "original"
