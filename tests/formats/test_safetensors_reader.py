"""Our safetensors reader (``formats/hf.py``: readinto, no mmap) against the safetensors library's own."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openautoglm.errors import CorruptModelError
from openautoglm.formats.hf import read_safetensors_header, read_safetensors_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool]


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dt in enumerate(DTYPES):
        x = torch.randn(3 + i, 5, generator=g) * 100
        out[f"t{i}"] = x.to(dt) if dt.is_floating_point else (x > 0 if dt == torch.bool else x.to(dt))
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 7)
    return out


def test_reads_every_tensor_as_the_library_does(tmp_path):
    fp = tmp_path / "m.safetensors"
    save_file(_tensors(), str(fp), metadata={"format": "pt", "note": "x"})
    base, entries, meta = read_safetensors_header(fp)
    assert meta == {"format": "pt", "note": "x"}
    with safe_open(str(fp), "pt") as f:
        assert sorted(entries) == sorted(f.keys())
        for k in f.keys():
            ours, theirs = read_safetensors_tensor(fp, base, entries[k]), f.get_tensor(k)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours, theirs)
            assert ours.data_ptr() % 64 == 0 or ours.numel() == 0  # owned and aligned: safe for the int8 kernel


def _rewrite_header(fp, edit):
    raw = fp.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    fp.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


@pytest.mark.parametrize("damage", ["truncated", "header_length", "offsets", "dtype", "not_json"])
def test_damaged_files_raise_one_typed_error(tmp_path, damage):
    fp = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, str(fp))
    raw = fp.read_bytes()
    if damage == "truncated":
        fp.write_bytes(raw[:-100])
    elif damage == "header_length":
        fp.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    elif damage == "offsets":
        _rewrite_header(fp, lambda h: h["a"].update(data_offsets=[0, 10]))
    elif damage == "dtype":
        _rewrite_header(fp, lambda h: h["a"].update(dtype="Q9"))
    else:
        n = struct.unpack("<Q", raw[:8])[0]
        fp.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    with pytest.raises(CorruptModelError):
        read_safetensors_header(fp)
