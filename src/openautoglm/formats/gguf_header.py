"""A fast, bounded reader of a GGUF file's header: metadata key/values and the tensor index.

Follows the GGUF spec (ggml ``docs/gguf.md``; versions 2 and 3, little-endian) and returns what gguf-py's
``GGUFReader`` gives through ``field.contents()`` and its tensor list, which the tests hold it to. gguf-py
builds a numpy view per value (3.5 s for SmolLM2's 49k-token vocabulary, 34 s for a 1M-entry array); this
reads strings with ``struct`` and numeric arrays with ``numpy.frombuffer`` from the file's first bytes (1 MiB,
read again at twice the size while the header runs past them), in tens of milliseconds.

Every count and length is checked against the bytes left before anything is allocated, so a corrupt or
hostile header is one :class:`CorruptModelError`, never a multi-GB allocation or a long loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CorruptModelError

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
MAX_TENSORS = 1 << 20

# GGUFValueType -> (struct code, size) for scalars; 8 = string, 9 = array
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order: fastest-varying dimension first
    type_id: int  # GGMLQuantizationType value
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFHeader:
    version: int
    metadata: dict  # key -> int | float | bool | str | list
    tensors: list[TensorEntry]
    data_start: int  # absolute offset of the tensor data section
    file_size: int


class _More(Exception):
    """The header runs past the bytes read so far (but not past the file): read up to ``upto`` and retry."""

    def __init__(self, upto: int):
        self.upto = upto


class _Cursor:
    def __init__(self, buf: bytes, path: Path, file_size: int):
        self.buf, self.pos, self.end, self.path = buf, 0, file_size, path

    def fail(self, what: str):
        raise CorruptModelError(f"{self.path} is corrupt or truncated: {what} (at byte {self.pos} of {self.end})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            self.fail(f"{what} needs {n} bytes, {self.end - self.pos} are left")
        if self.pos + n > len(self.buf):
            raise _More(self.pos + n)

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")  # gguf-py decodes leniently too


def _strings(c: _Cursor, n: int, key: str) -> list[str]:
    """n length-prefixed strings (the hot loop of a vocabulary: locals only, one bound check a string)."""
    buf, pos, have, unpack, out = c.buf, c.pos, len(c.buf), struct.unpack_from, []
    append = out.append
    for _ in range(n):
        if pos + 8 > have:
            c.pos = pos
            c.need(8, f"element of {key}")
        (k,) = unpack("<Q", buf, pos)
        pos += 8
        if pos + k > have:
            c.pos = pos
            c.need(k, f"element of {key}")
        append(buf[pos : pos + k].decode("utf-8", "replace"))
        pos += k
    c.pos = pos
    return out


def _value(c: _Cursor, vtype: int, key: str):
    if vtype in _SCALARS:
        code, size = _SCALARS[vtype]
        v = c.scalar(code, size, f"value of {key}")
        return bool(v) if vtype == 7 else v
    if vtype == 8:
        return c.string(f"value of {key}")
    if vtype == 9:
        etype = c.u32(f"element type of {key}")
        n = c.u64(f"length of {key}")
        if etype in _SCALARS:
            size = _SCALARS[etype][1]
            c.need(n * size, f"{n} elements of {key}")
            arr = np.frombuffer(c.buf, dtype=_NP[etype], count=n, offset=c.pos)
            c.pos += n * size
            return arr.astype(bool).tolist() if etype == 7 else arr.tolist()
        if etype == 8:
            c.need(n * 8, f"{n} strings of {key}")  # each at least its 8-byte length
            return _strings(c, n, key)
        if etype == 9:
            c.need(n * 12, f"{n} arrays of {key}")
            return [_value(c, 9, key) for _ in range(n)]
        c.fail(f"{key} has arrays of unknown type {etype}")
    c.fail(f"{key} has unknown value type {vtype}")


def read_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise CorruptModelError(f"{path} is too short ({size} bytes) to be a GGUF file")
            n = 1 << 20
            while True:
                f.seek(0)
                buf = f.read(min(n, size))
                try:
                    return _parse(buf, path, size)
                except _More as m:
                    n = max(2 * n, m.upto + (1 << 20))
    except OSError as e:
        raise CorruptModelError(f"{path} cannot be read ({e})") from None


def _parse(buf: bytes, path: Path, size: int) -> GGUFHeader:
    c = _Cursor(buf, path, size)
    try:
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise CorruptModelError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        c.pos = 4
        version = c.u32("version")
        if version not in (2, 3):
            c.fail(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
        if n_tensors > MAX_TENSORS or n_tensors * 24 > size or n_kv * 13 > size:
            c.fail(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in {size} bytes")
        meta: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            meta[key] = _value(c, c.u32(f"type of {key}"), key)
        tensors = []
        seen = set()
        for _ in range(n_tensors):
            name = c.string("tensor name")
            nd = c.u32(f"dimension count of {name}")
            if not 1 <= nd <= MAX_DIMS:
                c.fail(f"tensor {name} has {nd} dimensions (1..{MAX_DIMS})")
            ne = tuple(c.u64(f"dimension of {name}") for _ in range(nd))
            type_id, off = c.u32(f"type of {name}"), c.u64(f"offset of {name}")
            if name in seen:
                c.fail(f"tensor {name} appears twice")
            seen.add(name)
            tensors.append(TensorEntry(name, ne, type_id, off))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
            c.fail(f"general.alignment {align!r} is not a power of two")
        data_start = -(-c.pos // align) * align
        tensors = [TensorEntry(t.name, t.ne, t.type_id, data_start + t.offset) for t in tensors]
        return GGUFHeader(version, meta, tensors, data_start, size)
    except struct.error as e:  # (need() runs first; kept as a backstop)
        raise CorruptModelError(f"{path} is corrupt or truncated ({e})") from None
