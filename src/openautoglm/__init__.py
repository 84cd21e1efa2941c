"""Open-AutoGLM: load, compress, compile and run small language models on CPUs and edge devices.

Kept lean on purpose: importing the package imports its error types only; torch and the engine come with the
first use of ``openautoglm.Engine`` (so the command line answers ``--help`` or a mistake in its arguments without
loading torch). Optional dependencies (transformers, fastapi, matplotlib, llama-cpp-python) are imported inside
the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import OpenAutoGLMError

if TYPE_CHECKING:
    from .engine import Engine

__version__ = "0.1.0"

__all__ = ["Engine", "OpenAutoGLMError", "__version__", "load"]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(model: str, **kwargs) -> "Engine":
    """Load a model (alias, HF directory or ``.gguf`` file) and return an :class:`Engine`."""
    from .engine import Engine

    return Engine(model=model, **kwargs)
