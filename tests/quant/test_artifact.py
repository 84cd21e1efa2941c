"""Quantized artifacts: save -> reload gives bit-identical logits; sizes follow the bits; atomic; the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from openautoglm import Engine
from openautoglm.errors import InvalidParameterError


CASES = [("int8", 32, "rtn", "int8"), ("int4", 32, "rtn", "int8"), ("int4", 64, "rtn", "same"),
         ("int3", 64, "rtn", "float"), ("int2", 32, "rtn", "int8"), ("w8a8", 32, "rtn", "same"),
         ("int4", 64, "gptq", "int8"), ("int3", 32, "awq", "int8")]


@pytest.mark.parametrize("scheme,group,method,emb", CASES)
def test_reloaded_artifact_gives_identical_logits(tiny_engine_dir, tmp_path, scheme, group, method, emb):
    eng = Engine(model=tiny_engine_dir, progress=False)
    plan = eng.quantize(scheme, group_size=group, method=method, embeddings=emb, calib_tokens=1024)
    # q, k, v, o, gate, up, down in each of 2 layers, and the tied table (lm_head) unless kept in float
    assert len(plan) == 2 * 7 + (emb != "float")
    out = eng.save(tmp_path / "art")
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert cfg["scheme"] == eng.quant_scheme and cfg["method"] == method and len(cfg["plan"]) == len(plan)
    assert cfg["source"] == str(tiny_engine_dir.resolve())
    again = Engine(model=out, progress=False)
    assert type(again.model.model.embed_tokens) is type(eng.model.model.embed_tokens)
    ids = torch.randint(0, 49152, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eng.model(ids), again.model(ids))
    assert again.infer("Hello", max_tokens=8) == eng.infer("Hello", max_tokens=8)
    assert again.tokenizer.chat_template == eng.tokenizer.chat_template


def test_untied_embedding_is_stored_and_reloaded(hf_tiny, tmp_path):
    from openautoglm.loader import load_model
    from openautoglm.quant import QuantPlan, quantize_
    from openautoglm.quant.artifact import save_artifact
    from openautoglm.quant.config import IntxWeightOnlyConfig
    from openautoglm.quant.modules import QuantEmbedding

    arch, _, d = hf_tiny
    model, ck = load_model(d, progress=False)
    done = quantize_(model, QuantPlan.uniform(IntxWeightOnlyConfig(4, 32), embeddings="int8"))
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert ("model.embed_tokens" in done) == (not model.config.tie_word_embeddings)

    class _Tok:  # the tiny checkpoints carry no tokenizer; save_artifact only writes its files
        bos_token, eos_token, chat_template, eog_ids = None, None, None, set()

        class backend:
            @staticmethod
            def save(path):
                open(path, "w").write("{}")

    out = save_artifact(model, ck.config, _Tok(), done, tmp_path / "a", "int4-g32")
    again, _ = load_model(out, progress=False)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


@pytest.mark.slow  # quantizes at six widths
def test_quantized_bytes_follow_the_bits(tiny_engine_dir, tmp_path):
    from safetensors import safe_open

    sizes = {}
    for scheme in ("int8", "int4", "int3", "int2"):
        eng = Engine(model=tiny_engine_dir, progress=False)
        weights = {n: m.weight.numel() for n, m in eng.model.named_modules() if isinstance(m, torch.nn.Linear)}
        plan = eng.quantize(scheme, group_size=128, embeddings="float", method="rtn")
        out = eng.save(tmp_path / scheme)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            sizes[scheme] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                                for k in f.keys() if k.endswith(("qweight", "scales", "zeros")))
        # exactly the codes (packed) plus 16-bit scales (and zeros) the configs account for
        layers = {n: m.in_features for n, m in eng.model.named_modules() if hasattr(m, "qweight")}
        assert 8 * sizes[scheme] == sum(weights[n] * c.bits_per_weight(layers[n]) for n, c in plan.items())
    assert sizes["int2"] < sizes["int3"] < sizes["int4"] < sizes["int8"]
    assert 0.5 < sizes["int4"] / sizes["int8"] < 0.6


def test_save_is_atomic_and_refuses_to_overwrite(tiny_engine_dir, tmp_path):
    eng = Engine(model=tiny_engine_dir, progress=False)
    with pytest.raises(InvalidParameterError):
        eng.save(tmp_path / "x")  # not quantized
    eng.quantize("int8", method="rtn")
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidParameterError):
        eng.save(tmp_path / "taken")
    eng.save(tmp_path / "ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "taken"]  # no temporary left behind


@pytest.mark.slow  # a quantize CLI process
def test_cli_quantize(tiny_engine_dir, tmp_path, capsys):
    from openautoglm import cli

    out = tmp_path / "q4"
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "quantize", "--model", str(tiny_engine_dir),
                        "--scheme", "int4", "--group-size", "64", "--output", str(out), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    info = Engine(model=out, progress=False).info()
    assert info["file_weight_bytes"].get("U8", 0) > 0
    bad_calib = str(tmp_path / "missing.txt")
    for bad in (["--scheme", "int4", "--group-size", "48"], ["--scheme", "auto"],
                ["--scheme", "int4", "--target-bits", "3"], ["--scheme", "auto", "--target-bits", "1.5"],
                ["--scheme", "w8a8", "--method", "awq"], ["--scheme", "int4", "--calib", bad_calib],
                ["--scheme", "int4", "--calib-tokens", "4"], ["--scheme", "int5"]):
        try:  # in-process: main() is what the CLI runs; argparse's own errors exit through SystemExit
            rc = cli.main(["quantize", "--model", str(tiny_engine_dir), *bad, "--output", str(tmp_path / "bad"), "-q"])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # an eval CLI process
def test_eval_of_an_artifact_defaults_to_its_source_as_reference(tiny_engine_dir, tmp_path):
    from openautoglm.bench.quality import run_eval

    eng = Engine(model=tiny_engine_dir, progress=False)
    eng.quantize("int3", group_size=32, method="rtn")
    out = eng.save(tmp_path / "q3")
    implicit = run_eval(str(out), n_tokens=256, ctx=128, progress=False)
    explicit = run_eval(str(out), reference=str(tiny_engine_dir), n_tokens=256, ctx=128, progress=False)
    assert implicit.kld_mean > 0 and implicit.to_dict() == explicit.to_dict()
    # bytes on disk: the artifact's tensors, well under the float checkpoint's
    src = run_eval(str(tiny_engine_dir), n_tokens=256, ctx=128, progress=False)
    assert src.kld_mean == 0 and implicit.weight_bytes < 0.5 * src.weight_bytes
