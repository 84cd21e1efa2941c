"""Each compiler pass against the model before the pass (the O0 oracle): logits and greedy tokens."""

import copy

import pytest
import torch

from openautoglm.compiler import PASSES, run_passes
from openautoglm.loader import load_model
from openautoglm.runtime.kv_cache import KVCache

EXPECTED_SITES = {  # per tiny arch (2 layers): which passes apply
    "fuse_qkv": 2,
    "fuse_gate_up": {"glm4": 0, "glm": 0},  # GLM checkpoints are already fused
    # 2 layers x (input norm + MLP-input norm), + the final norm when lm_head is untied
    "fold_rmsnorm": {"llama-tied": 4, "qwen2": 4, "glm4": 5, "glm": 5, "llama-untied": 5, "llama3-scaled": 5},
}


@pytest.mark.parametrize("names", [("fuse_qkv",), ("fuse_gate_up",), ("fold_rmsnorm",), PASSES])
def test_pass_preserves_logits_and_cached_decode(hf_tiny, names):
    arch, _, d = hf_tiny
    before, _ = load_model(d, progress=False)
    after = copy.deepcopy(before)
    sites = run_passes(after, names)
    for n in names:
        exp = EXPECTED_SITES[n]
        assert sites[n] == (exp.get(arch, 2) if isinstance(exp, dict) else exp)
    ids = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(after(ids), before(ids), atol=2e-5, rtol=0)  # GEMM order only
        c0, c1 = KVCache.for_model(before, 2, 40), KVCache.for_model(after, 2, 40)
        pos = torch.arange(30).expand(2, 30)
        before(ids[:, :20], pos[:, :20], c0)
        after(ids[:, :20], pos[:, :20], c1)
        torch.testing.assert_close(after(ids[:, 20:], pos[:, 20:], c1), before(ids[:, 20:], pos[:, 20:], c0),
                                   atol=2e-5, rtol=0)


def test_passes_keep_greedy_generation(tiny_engine_dir):
    from openautoglm import Engine

    e0 = Engine(model=tiny_engine_dir, progress=False)
    e1 = Engine(model=tiny_engine_dir, progress=False)
    run_passes(e1.model)
    for p in ("Hello there", "def f(x):", "東京 😀"):
        assert e1.generate(p, max_tokens=24, ignore_eos=True)[0].token_ids == \
            e0.generate(p, max_tokens=24, ignore_eos=True)[0].token_ids


def test_passes_are_idempotent_and_skip_quantized(tiny_engine_dir):
    from openautoglm.quant import Int8WeightOnlyConfig, quantize_

    m, _ = load_model(tiny_engine_dir, progress=False)
    assert run_passes(m) == {"fuse_qkv": 2, "fuse_gate_up": 2, "fold_rmsnorm": 4}  # tied head: final norm kept
    assert run_passes(m) == {"fuse_qkv": 0, "fuse_gate_up": 0, "fold_rmsnorm": 0}
    q, _ = load_model(tiny_engine_dir, progress=False)
    quantize_(q, Int8WeightOnlyConfig())
    assert run_passes(q) == {"fuse_qkv": 0, "fuse_gate_up": 0, "fold_rmsnorm": 0}
