"""The format-neutral view of a model file: an HF-style config dict, named tensors, tokenizer data.

Readers (``gguf.py``, ``hf.py``) produce a :class:`Checkpoint`; nothing above ``formats/`` needs to know which
format a model came from. Tensors are read lazily, one at a time, as float32 under HF names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


VOCABULARY_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")


def map_owned(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``offset`` as a private (copy-on-write) mapping: nothing is read now, a
    page becomes resident when first touched. The tensor keeps the mapping alive; the file can be closed, renamed
    or replaced meanwhile (the mapping holds the inode)."""
    import mmap

    if not nbytes or not hasattr(mmap, "MAP_PRIVATE"):  # (an empty tensor; an OS without private mappings)
        return read_owned(path, offset, nbytes, "a tensor")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), offset + nbytes - start, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    return torch.frombuffer(m, dtype=torch.uint8, offset=offset - start, count=nbytes)


def read_owned(path: Path, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``offset``, read into a uint8 tensor of their own (no mmap, so no file
    pages stay resident once read; aligned by torch's allocator; huge pages where the OS gives them on request:
    ``sysmem.empty_huge``). CorruptModelError naming ``what`` when short."""
    from ..errors import CorruptModelError
    from ..sysmem import empty_huge

    buf = empty_huge(nbytes)
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
    # optional: load_raw's bytes mapped from the file, resident page by page as they are read
    _map_loader: Callable[[str], torch.Tensor] | None = None

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (HF name) as float32, with any format-specific layout undone."""
        return self._loader(name)

    def load_raw(self, name: str) -> torch.Tensor:
        """The tensor ``name`` with its stored dtype (for integer codes); falls back to :meth:`load`."""
        if name not in self.tensors:
            from ..errors import InvalidModelError

            raise InvalidModelError(f"{self.path} lacks tensor {name}")
        return (self._raw_loader or self._loader)(name)

    def map_raw(self, name: str) -> torch.Tensor:
        """``load_raw``'s tensor, mapped from the file where the format allows (pages resident as rows are
        read: for tables only gathered from), else read."""
        if self._map_loader is None or name not in self.tensors:
            return self.load_raw(name)
        return self._map_loader(name)

    def release_vocabulary(self) -> None:
        """Drop a GGUF's tokenizer arrays (tokens, merges, token types) once the tokenizer is built from them:
        Qwen2's 151k tokens and 151k merges are ~25 MB of Python strings otherwise held for the process's life."""
        for meta in (self.tokenizer.get("metadata") or {}, self.metadata):
            for key in VOCABULARY_ARRAYS:
                meta.pop(key, None)

    def weight_bytes_by_storage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.storage] = out.get(t.storage, 0) + t.nbytes
        return out
