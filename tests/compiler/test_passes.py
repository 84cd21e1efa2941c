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


@pytest.mark.parametrize("names", [("fuse_qkv",), ("fuse_gate_up",), ("fold_rmsnorm",), ("dead_ops",), PASSES])
def test_pass_preserves_logits_and_cached_decode(hf_tiny, names):
    arch, _, d = hf_tiny
    before, _ = load_model(d, progress=False)
    after = copy.deepcopy(before)
    sites = run_passes(after, names)
    for n in names:
        if n not in EXPECTED_SITES:
            continue
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


def test_passes_are_idempotent(tiny_engine_dir):
    m, _ = load_model(tiny_engine_dir, progress=False)
    # tied head: the final norm is not folded; its weight is all ones (HF init), so dead-op removal drops it
    assert run_passes(m) == {"fuse_qkv": 2, "fuse_gate_up": 2, "fold_rmsnorm": 4, "dead_ops": 1}
    assert run_passes(m) == {"fuse_qkv": 0, "fuse_gate_up": 0, "fold_rmsnorm": 0, "dead_ops": 0}


def test_dead_op_removal_drops_identities_only(hf_tiny):
    from openautoglm.models.layers import RMSNorm

    arch, _, d = hf_tiny
    before, _ = load_model(d, progress=False)
    with torch.no_grad():  # identities to remove: a unit-scale norm, a zero bias; the random rest stays
        before.model.layers[1].post_attention_layernorm.weight.fill_(1.0)
        attn = before.model.layers[1].self_attn
        zeroed = getattr(attn, "q_proj", None) is not None and attn.q_proj.bias is not None
        if zeroed:
            attn.q_proj.bias.zero_()
    after = copy.deepcopy(before)
    n = run_passes(after, ("dead_ops",))["dead_ops"]
    assert n == 1 + zeroed
    assert type(after.model.layers[1].post_attention_layernorm) is not RMSNorm
    assert type(after.model.layers[0].input_layernorm) is RMSNorm  # a real scale stays
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(after(ids), before(ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "int3-g64", "w8a8"])
def test_fusion_of_quantized_layers_is_exact(tiny_engine_dir, scheme):
    from openautoglm.quant import QuantPlan, quantize_
    from openautoglm.quant.config import parse_scheme

    q, _ = load_model(tiny_engine_dir, progress=False)
    quantize_(q, QuantPlan.uniform(parse_scheme(scheme), embeddings="int8"))
    ref = copy.deepcopy(q)
    # quantized weights cannot absorb a norm exactly: only the fusions apply
    sites = run_passes(q)
    assert (sites["fuse_qkv"], sites["fuse_gate_up"], sites["fold_rmsnorm"]) == (2, 2, 0)
    ids = torch.randint(0, 49152, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the same codes and qparams, one kernel call: equal up to the kernel's blocking (bf16 activations)
        torch.testing.assert_close(q(ids), ref(ids), atol=1e-4, rtol=0)
    mixed, _ = load_model(tiny_engine_dir, progress=False)
    quantize_(mixed, QuantPlan((("*.k_proj", parse_scheme("int8")), ("*", parse_scheme(scheme)))))
    assert run_passes(mixed, ("fuse_qkv",))["fuse_qkv"] == (2 if scheme == "int8" else 0)
