"""The format-neutral view of a model file: an HF-style config dict, named tensors, tokenizer data.

Readers (``gguf.py``, ``hf.py``) produce a :class:`Checkpoint`; nothing above ``formats/`` needs to know which
format a model came from. Tensors are read lazily, one at a time, as float32 under HF names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


def read_owned(path: Path, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``offset``, read into a uint8 tensor of their own (no mmap, so no file
    pages stay resident once read; aligned by torch's allocator). CorruptModelError naming ``what`` when short."""
    from ..errors import CorruptModelError

    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            if nbytes and f.readinto(buf.numpy()) != nbytes:
                raise EOFError("short read")
    except (OSError, EOFError) as e:
        raise CorruptModelError(f"{path}: cannot read {what} ({e}); the file is corrupt or truncated") from None
    return buf


@dataclass
class TensorInfo:
    """Where a tensor comes from: its storage type (``F32``, ``BF16``, ``Q4_1``...), shape and bytes on disk."""

    name: str
    shape: tuple[int, ...]
    storage: str
    nbytes: int


@dataclass
class Checkpoint:
    path: Path
    format: str  # "gguf" | "safetensors"
    config: dict  # HF config.json-style dict
    tensors: dict[str, TensorInfo]  # by HF name
    _loader: Callable[[str], torch.Tensor]
    # tokenizer source: {"kind": "gguf", "metadata": {...}} or {"kind": "hf", "dir": Path}
    tokenizer: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # format-level metadata (GGUF key/values, safetensors header)

    # optional: the tensor exactly as stored (integer codes of quantized artifacts)
    _raw_loader: Callable[[str], torch.Tensor] | None = None

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (HF name) as float32, with any format-specific layout undone."""
        return self._loader(name)

    def load_raw(self, name: str) -> torch.Tensor:
        """The tensor ``name`` with its stored dtype (for integer codes); falls back to :meth:`load`."""
        if name not in self.tensors:
            from ..errors import InvalidModelError

            raise InvalidModelError(f"{self.path} lacks tensor {name}")
        return (self._raw_loader or self._loader)(name)

    def weight_bytes_by_storage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.storage] = out.get(t.storage, 0) + t.nbytes
        return out
