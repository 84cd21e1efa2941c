"""``openautoglm eval`` against an independent computation from transformers' logits."""

import json
import math
import subprocess
import sys

import pytest
import torch

from openautoglm import Engine
from openautoglm.bench.quality import OursScorer, evaluate, windows


def test_eval_matches_transformers_perplexity(tiny_engine_dir):
    from transformers import AutoModelForCausalLM

    eng = Engine(model=tiny_engine_dir, progress=False)
    toks = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 40)
    res = evaluate(OursScorer(eng), OursScorer(eng), toks, n_tokens=200, ctx=64, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_engine_dir, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for w in windows(toks, 200, 64):
            lp = torch.log_softmax(hf(torch.tensor([w])).logits[0, :-1].double(), -1)
            nll.append(-lp.gather(1, torch.tensor(w[1:])[:, None])[:, 0])
    ref_ppl = math.exp(float(torch.cat(nll).mean()))
    assert res.tokens == 3 * 63 and res.windows == 3
    assert abs(res.ppl - ref_ppl) / ref_ppl < 1e-5
    assert res.kld_mean < 1e-9 and res.top1_agreement == 1.0  # same model on both sides


def test_bf16_has_small_positive_kld(tiny_engine_dir):
    ref = OursScorer(Engine(model=tiny_engine_dir, progress=False))
    cand = OursScorer(Engine(model=tiny_engine_dir, progress=False, dtype="bf16"))
    toks = ref.engine.tokenizer.encode("Hello world, this is a test of the evaluation code. " * 20)
    r = evaluate(cand, ref, toks, n_tokens=128, ctx=64, progress=False)
    assert 0 < r.kld_mean < 0.05 and r.kld_p99 >= r.kld_mean
    assert 0.5 < r.top1_agreement <= 1.0
    assert r.ppl_reference != r.ppl


@pytest.mark.slow  # an eval CLI process
def test_eval_cli_json(tiny_engine_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Some real looking text, with words and numbers 1 2 3. " * 30)
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "eval", "--model", str(tiny_engine_dir), "--text",
                        str(text), "--tokens", "128", "--ctx", "64", "--dtype", "bf16", "--opt", "O0", "--json", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for k in ("ppl", "ppl_reference", "kld_mean", "kld_p99", "top1_agreement", "tokens", "weight_bytes",
              "bits_per_weight"):
        assert k in r
    # bits per weight on disk (the fp32 checkpoint); in memory the bf16 run holds half of that
    assert r["tokens"] == 126 and r["bits_per_weight"] == 32.0
    assert r["runtime_weight_bytes"] * 2 == r["weight_bytes"]


def test_eval_at_o1_scores_the_rewritten_model_like_o0(tiny_engine_dir, tmp_path):
    # O1's passes (fusions, RMSNorm folding) are exact up to float rounding: the O1 candidate against the O0
    # reference is nearly KLD-free, and the engine that was scored really is the compiled one
    import pytest

    from openautoglm.bench.quality import run_eval
    from openautoglm.errors import OptimizeLevelError

    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 30)
    r = run_eval(str(tiny_engine_dir), text_file=str(f), n_tokens=128, ctx=64, progress=False, opt="O1")
    assert r.model.endswith(" O1")
    assert 0 <= r.kld_mean < 1e-6 and r.top1_agreement == 1.0
    assert abs(r.ppl - r.ppl_reference) / r.ppl_reference < 1e-4
    with pytest.raises(OptimizeLevelError):
        run_eval(str(tiny_engine_dir), text_file=str(f), n_tokens=128, ctx=64, progress=False, opt="O9")


@pytest.mark.parametrize("opt", ["O0", "O1"])
def test_eval_decode_scores_one_token_a_step_like_the_whole_window(tiny_engine_dir, tmp_path, opt):
    # cached == uncached: position by position through the KV cache (O1: the planned cache, reused across
    # windows) gives the whole-window logits of the O0 reference
    from openautoglm.bench.quality import run_eval

    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 30)
    r = run_eval(str(tiny_engine_dir), text_file=str(f), n_tokens=128, ctx=64, progress=False, opt=opt, decode=True)
    assert r.model.endswith(" decode") and r.windows == 2
    assert 0 <= r.kld_mean < 1e-6 and r.top1_agreement == 1.0


@pytest.mark.slow  # an eval CLI process
def test_eval_peer_on_a_model_that_is_not_gguf_is_one_clear_error(tiny_engine_dir, tmp_path):
    """llama.cpp scores GGUF files only: a safetensors model with --peer gets exit 2 and one line, before any
    peer library is loaded (this test runs without llama-cpp-python too)."""
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "eval", "--model", str(tiny_engine_dir), "--reference",
                        str(tiny_engine_dir), "--peer", "llama.cpp", "--text", str(f), "--tokens", "64", "--ctx", "32",
                        "-q"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    err = [l for l in p.stderr.strip().splitlines() if l]
    assert len(err) == 1 and "GGUF" in err[0] and "Traceback" not in p.stderr
