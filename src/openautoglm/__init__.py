"""Open-AutoGLM: load, compress, compile and run small language models on CPUs and edge devices.

Kept lean on purpose: importing the package imports torch and the package's own light modules only; optional
dependencies (transformers, fastapi, matplotlib, llama-cpp-python) are imported inside the functions that need
them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .engine import Engine
from .errors import OpenAutoGLMError

__all__ = ["Engine", "OpenAutoGLMError", "__version__", "load"]


def load(model: str, **kwargs) -> Engine:
    """Load a model (alias, HF directory or ``.gguf`` file) and return an :class:`Engine`."""
    return Engine(model=model, **kwargs)
