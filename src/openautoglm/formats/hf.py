"""HF checkpoint directory reader: ``config.json`` plus one or more ``*.safetensors`` (with an index if sharded).

Each tensor is read with ``readinto`` straight into a buffer of its own (no mmap held open): a tensor exists once
in memory, owned, aligned by torch's allocator, with no file pages counted against the process for as long as
the checkpoint lives (a safetensors mmap keeps every page read resident, ~the file's size on top of the model).
Float tensors are returned as float32, integer codes (quantized artifacts) as stored.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import CorruptModelError, InvalidModelError
from .checkpoint import Checkpoint, TensorInfo, read_owned

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}
_MAX_HEADER = 100 << 20


def read_safetensors_header(fp: Path) -> tuple[int, dict, dict]:
    """(offset of the data section, {name: entry}, metadata) of a safetensors file, checked against its size."""
    size = fp.stat().st_size
    try:
        with open(fp, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, _MAX_HEADER):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("__metadata__ must map strings to strings")
        data_size = size - 8 - n
        for k, e in header.items():
            lo, hi = e["data_offsets"]
            count = 1
            for d in e["shape"]:
                count *= int(d)
            dt = _DTYPES.get(e["dtype"])
            if dt is None or not 0 <= lo <= hi <= data_size or hi - lo != count * dt.itemsize:
                raise ValueError(f"tensor {k}: bad dtype, shape or offsets")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise CorruptModelError(f"{fp} is corrupt or truncated ({e})") from None
    return 8 + n, header, meta


def read_safetensors_tensor(fp: Path, base: int, entry: dict, name: str = "a tensor") -> torch.Tensor:
    lo, hi = entry["data_offsets"]
    return read_owned(fp, base + lo, hi - lo, name).view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{p} is not valid JSON ({e})") from None


def read_hf_dir(path: str | Path) -> Checkpoint:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InvalidModelError(f"{path} has no config.json; pass a HF model directory or a .gguf file")
    cfg = read_json(cfg_path)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        idx = read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise CorruptModelError(f"{index} must hold a weight_map of tensor names to file names in {path}")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"{path} has no *.safetensors weights")

    infos: dict[str, TensorInfo] = {}
    where: dict[str, tuple[Path, int, dict]] = {}
    meta: dict = {}
    for fn in files:
        fp = path / fn
        if not fp.is_file():
            raise InvalidModelError(f"{path}: the index names {fn}, which is missing")
        base, entries, m = read_safetensors_header(fp)
        meta.update(m)
        for k, e in entries.items():
            infos[k] = TensorInfo(k, tuple(e["shape"]), e["dtype"], e["data_offsets"][1] - e["data_offsets"][0])
            where[k] = (fp, base, e)

    def load_raw(name: str) -> torch.Tensor:
        return read_safetensors_tensor(*where[name], name=f"tensor {name}")

    def load(name: str) -> torch.Tensor:
        t = load_raw(name)
        return t.to(torch.float32) if t.is_floating_point() else t

    return Checkpoint(
        path=path, format="safetensors", config=cfg, tensors=infos, _loader=load, _raw_loader=load_raw,
        tokenizer={"kind": "hf", "dir": path}, metadata=meta,
    )
