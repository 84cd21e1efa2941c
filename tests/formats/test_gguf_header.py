"""Our GGUF header reader against gguf-py's GGUFReader (the oracle): every metadata value and the tensor index
(name, dims, type, absolute data offset) equal, on files of every value type and on the embedded model."""

import gguf
import numpy as np
import pytest

from conftest import make_hf_model
from gguf_util import write_gguf
from openautoglm.errors import CorruptModelError
from openautoglm.formats.gguf_header import read_header


def oracle(path):
    r = gguf.GGUFReader(path, "r")
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in r.tensors]
    return meta, tensors


def ours(path):
    h = read_header(path)
    return h.metadata, [(t.name, t.ne, t.type_id, t.offset) for t in h.tensors]


def test_every_value_type_and_alignment(tmp_path):
    p = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.25)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ☃")
    w.add_string("t.empty", "")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.5])
    w.add_array("t.arr_str", ["a", "", "ü"])
    w.add_array("t.arr_bool", [True, False])
    w.add_array("t.arr_empty", [])
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.ones((5,), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert ours(p) == oracle(p)


@pytest.mark.slow  # the embedded model's tokenizer, and gguf-py's reading of whole files
@pytest.mark.parametrize("arch,qtype", [("llama", "Q8_0"), ("qwen2", None), ("glm4", "Q4_1")])
def test_model_files_match_gguf_py(tmp_path, arch, qtype, smollm2_tokenizer_meta):
    hf = make_hf_model({"llama": "llama-untied", "qwen2": "qwen2", "glm4": "glm4"}[arch])
    p = write_gguf(tmp_path / "m.gguf", hf, arch, qtype=qtype, tokenizer_meta=smollm2_tokenizer_meta)
    assert ours(p) == oracle(p)


@pytest.mark.slow
def test_the_embedded_model_matches_gguf_py(smollm2_path):
    assert ours(smollm2_path) == oracle(smollm2_path)


def test_truncated_and_absurd_headers_are_one_clear_error(tmp_path, smollm2_tokenizer_meta):
    p = write_gguf(tmp_path / "m.gguf", make_hf_model("llama-tied"), "llama", tokenizer_meta=smollm2_tokenizer_meta)
    data = p.read_bytes()
    end = read_header(p).data_start
    for cut in (3, 10, 23, 100, end // 2, end - 40):  # (the last 0-31 bytes before data_start are padding)
        (tmp_path / "t.gguf").write_bytes(data[:cut])
        with pytest.raises(CorruptModelError):
            read_header(tmp_path / "t.gguf")
    for off, val in ((16, 2**63), (8, 2**40)):  # metadata count, tensor count
        b = bytearray(data)
        b[off : off + 8] = val.to_bytes(8, "little")
        (tmp_path / "t.gguf").write_bytes(bytes(b))
        with pytest.raises(CorruptModelError, match="cannot fit"):
            read_header(tmp_path / "t.gguf")
