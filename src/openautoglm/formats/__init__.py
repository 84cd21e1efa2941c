"""Model file formats: GGUF and HF safetensors directories, read into a format-neutral :class:`Checkpoint`.

This layer knows nothing of models: it yields an HF-style config dict and float32 tensors under HF names.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidModelError, ModelNotFoundError
from .checkpoint import Checkpoint, TensorInfo

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a ``.gguf`` file or a HF directory. Raises a typed error on anything else."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model not found: {p} does not exist")
    if p.is_dir():
        from .hf import read_hf_dir

        return read_hf_dir(p)
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        from .gguf import read_gguf

        return read_gguf(p)
    raise InvalidModelError(f"{p} is neither a .gguf file nor a HF model directory")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
