"""HF checkpoint directory reader: ``config.json`` plus one or more ``*.safetensors`` (with an index if sharded).

Tensors are opened through ``safetensors.safe_open`` (mmap) and read one at a time as float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CorruptModelError, InvalidModelError
from .checkpoint import Checkpoint, TensorInfo

_DTYPE_NAMES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "I16": 2}


def read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"{p} is not valid JSON ({e})") from None


def read_hf_dir(path: str | Path) -> Checkpoint:
    from safetensors import safe_open

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InvalidModelError(f"{path} has no config.json; pass a HF model directory or a .gguf file")
    cfg = read_json(cfg_path)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise InvalidModelError(f"{path} has no *.safetensors weights")

    infos: dict[str, TensorInfo] = {}
    where: dict[str, str] = {}
    handles = {}
    meta: dict = {}
    for fn in files:
        fp = path / fn
        if not fp.is_file():
            raise InvalidModelError(f"{path}: the index names {fn}, which is missing")
        try:
            h = safe_open(str(fp), framework="pt")
        except Exception as e:
            raise CorruptModelError(f"{fp} is corrupt or truncated ({e})") from None
        handles[fn] = h
        meta.update(h.metadata() or {})
        for k in h.keys():
            sl = h.get_slice(k)
            dt = sl.get_dtype()
            shape = tuple(sl.get_shape())
            n = 1
            for s in shape:
                n *= s
            infos[k] = TensorInfo(k, shape, dt, n * _DTYPE_NAMES.get(dt, 4))
            where[k] = fn

    def load_raw(name: str) -> torch.Tensor:
        try:
            return handles[where[name]].get_tensor(name)
        except Exception as e:
            raise CorruptModelError(f"{path}: cannot read tensor {name} ({e})") from None

    def load(name: str) -> torch.Tensor:
        t = load_raw(name)
        return t.to(torch.float32) if t.is_floating_point() else t

    return Checkpoint(
        path=path, format="safetensors", config=cfg, tensors=infos, _loader=load, _raw_loader=load_raw,
        tokenizer={"kind": "hf", "dir": path}, metadata=meta,
    )
