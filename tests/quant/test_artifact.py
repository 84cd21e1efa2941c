"""Quantized artifacts: save -> reload gives bit-identical logits; sizes follow the bits; atomic; the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from openautoglm import Engine
from openautoglm.errors import InvalidParameterError


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int4", 32), ("int4", 64)])
def test_reloaded_artifact_gives_identical_logits(tiny_engine_dir, tmp_path, scheme, group):
    eng = Engine(model=tiny_engine_dir, progress=False)
    plan = eng.quantize(scheme, group_size=group)
    assert len(plan) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; lm_head kept
    out = eng.save(tmp_path / "art")
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg["scheme"] == eng.quant_scheme and cfg["method"] == "rtn" and len(cfg["plan"]) == len(plan)
    again = Engine(model=out, progress=False)
    ids = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eng.model(ids), again.model(ids))
    assert again.infer("Hello", max_tokens=8) == eng.infer("Hello", max_tokens=8)
    assert again.tokenizer.chat_template == eng.tokenizer.chat_template


def test_quantized_bytes_follow_the_bits(tiny_engine_dir, tmp_path):
    sizes = {}
    for scheme in ("int8", "int4"):
        eng = Engine(model=tiny_engine_dir, progress=False)
        eng.quantize(scheme, group_size=128)
        out = eng.save(tmp_path / scheme)
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            sizes[scheme] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                                for k in f.keys() if k.endswith(("qweight", "scales", "zeros")))
    assert 0.45 < sizes["int4"] / sizes["int8"] < 0.6


def test_save_is_atomic_and_refuses_to_overwrite(tiny_engine_dir, tmp_path):
    eng = Engine(model=tiny_engine_dir, progress=False)
    with pytest.raises(InvalidParameterError):
        eng.save(tmp_path / "x")  # not quantized
    eng.quantize("int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidParameterError):
        eng.save(tmp_path / "taken")
    eng.save(tmp_path / "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "taken"]  # no temporary left behind


def test_cli_quantize(tiny_engine_dir, tmp_path):
    out = tmp_path / "q4"
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "quantize", "--model", str(tiny_engine_dir),
                        "--scheme", "int4", "--group-size", "64", "--output", str(out), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = Engine(model=out, progress=False).info()
    assert info["file_weight_bytes"].get("U8", 0) > 0
    for bad in (["--scheme", "int3"], ["--scheme", "int4", "--method", "gptq"], ["--scheme", "int4", "--group-size", "48"]):
        p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "quantize", "--model", str(tiny_engine_dir),
                            *bad, "--output", str(tmp_path / "bad"), "-q"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not (tmp_path / "bad").exists()
