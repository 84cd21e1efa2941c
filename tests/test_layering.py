"""No import cycles between the packages of src/openautoglm: every import is read from the source (those inside
functions too), each module is mapped to its package (a subpackage, or a top-level module of its own), and
the package graph must be acyclic. A cycle means two layers know each other (DESIGN.md: one direction only)."""

import ast
from pathlib import Path

import openautoglm

ROOT = Path(openautoglm.__file__).parent


def _package(mod: str) -> str | None:
    """'openautoglm.compiler.autotune' -> 'compiler'; 'openautoglm.engine' -> 'engine'; 'openautoglm' -> None."""
    parts = mod.split(".")
    return parts[1] if parts[0] == "openautoglm" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    pkg = list(path.relative_to(ROOT.parent).parts[:-1])  # the package this file is in: ['openautoglm', 'quant']
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import kernels` names a module
    return out


def package_graph() -> dict[str, set[str]]:
    modules = {p for p in ROOT.rglob("*.py")}
    known = {_package("openautoglm." + ".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in modules}
    g: dict[str, set[str]] = {}
    for p in modules:
        src = _package("openautoglm." + ".".join(p.relative_to(ROOT).with_suffix("").parts))
        if src in (None, "__init__"):
            continue
        for m in _imports(p):
            dst = _package(m)
            if dst in known and dst not in (src, "__init__"):
                g.setdefault(src, set()).add(dst)
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_graph_sees_imports_inside_functions():
    g = package_graph()
    assert "models" in g.get("runtime", set())  # runtime.kv_cache: from ..models.layers import from_start
    assert "serve" in g.get("cli", set())  # cli.cmd_serve imports the server inside the function


def test_no_import_cycles_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_importing_the_package_leaves_torch_unloaded():
    # torch (~2.5 s) comes with the Engine: the command line answers --help or a bad argument without it
    import subprocess
    import sys

    code = ("import sys, openautoglm, openautoglm.cli; print('torch' in sys.modules); "
            "openautoglm.Engine; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
