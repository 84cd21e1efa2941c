"""Every user mistake named in the core issue: a typed exception from the API, exit 2 + one line from the CLI."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from conftest import make_hf_model
from gguf_util import write_gguf
from openautoglm import Engine
from openautoglm.errors import (ContextLengthExceededError, CorruptModelError, DeviceNotAvailableError,
                                InvalidModelError, InvalidParameterError, ModelNotFoundError, OpenAutoGLMError,
                                OptimizeLevelError, UnsupportedArchitectureError, UnsupportedQuantTypeError)
from openautoglm.loader import load_model


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("g") / "tiny.gguf", make_hf_model("llama-untied"), "llama")


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError):
        Engine(model="/nonexistent.gguf")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidModelError, match="config.json"):
        load_model(tmp_path)


def test_unknown_architecture_hf(tmp_path):
    d = tmp_path / "m"
    make_hf_model("llama-tied").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba9000"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="mamba9000"):
        load_model(d)


def test_unknown_architecture_gguf(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba9000")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedArchitectureError, match="mamba9000"):
        load_model(tmp_path / "x.gguf")


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(CorruptModelError):
        load_model(p)
    q = tmp_path / "notgguf.gguf"
    q.write_bytes(b"hello world, not a model")
    with pytest.raises(CorruptModelError):
        load_model(q)


def test_truncated_gguf(tmp_path, good_gguf):
    data = good_gguf.read_bytes()
    for frac in (0.5, 0.9, 0.999):
        p = tmp_path / f"trunc{frac}.gguf"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(CorruptModelError):
            load_model(p)


def test_unsupported_quant_type(tmp_path):
    hf = make_hf_model("llama-untied")
    p = write_gguf(tmp_path / "iq.gguf", hf, "llama")
    # rewrite with one tensor stored as IQ4_NL (a type we do not dequantize)
    r = gguf.GGUFReader(str(p))
    w = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_string(k, v)
    for t in r.tensors:
        if t.name == "blk.0.ffn_down.weight":
            bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            rows, cols = t.data.shape
            w.add_tensor(t.name, np.zeros((rows, cols // bs * ts), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedQuantTypeError, match="IQ4_NL"):
        load_model(tmp_path / "iq2.gguf")


def test_prompt_longer_than_context(tiny_engine):
    with pytest.raises(ContextLengthExceededError, match="context window is 1024"):
        tiny_engine.infer("word " * 1100)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
                                dict(min_p=2.0), dict(repetition_penalty=-1.0)])
def test_invalid_sampling_values(tiny_engine, kw):
    with pytest.raises(InvalidParameterError):
        tiny_engine.infer("hi", **kw)


def test_bad_input_data(tiny_engine):
    for bad in (None, 42, [], [1, 2], [{"content": "no role"}]):
        with pytest.raises(InvalidParameterError):
            tiny_engine.infer(bad)


def test_devices_and_levels(tiny_engine):
    with pytest.raises(DeviceNotAvailableError, match="available: cpu"):
        tiny_engine.enable_hardware_acceleration("npu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceNotAvailableError, match="'cuda' is not available"):
            tiny_engine.enable_hardware_acceleration("cuda")
    assert tiny_engine.enable_hardware_acceleration("auto").device in ("cpu", "cuda")
    tiny_engine.enable_hardware_acceleration("cpu")
    with pytest.raises(OptimizeLevelError, match="unknown"):
        tiny_engine.compile("O9")
    assert tiny_engine.compile("o0").optimize_level == "O0"
    with pytest.raises(InvalidParameterError, match="max_batch"):
        tiny_engine.compile("O1", max_batch=0)


def test_errors_share_one_base():
    for e in (ModelNotFoundError, InvalidModelError, CorruptModelError, UnsupportedArchitectureError,
              UnsupportedQuantTypeError, ContextLengthExceededError, InvalidParameterError,
              DeviceNotAvailableError, OptimizeLevelError):
        assert issubclass(e, OpenAutoGLMError)


@pytest.mark.parametrize("args", [
    ["run", "--model", "/nonexistent.gguf", "--prompt", "hi"],
    ["run", "--prompt", "hi", "--temperature", "-1"],
    ["run", "--prompt", "hi", "--device", "npu"],
    ["run", "--prompt", "hi", "--opt", "O7"],
    ["run", "--prompt", "hi", "--max-tokens", "abc"],
    ["info", "--model", "/nonexistent.gguf"],
])
def test_cli_errors_exit_2_with_one_line(args):
    rc, out, err = cli(*args)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def test_cli_model_errors_exit_2(tmp_path, good_gguf):
    p = tmp_path / "t.gguf"
    p.write_bytes(good_gguf.read_bytes()[:1000])
    rc, out, err = cli("run", "--model", str(p), "--prompt", "hi", "-q")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "corrupt" in err
