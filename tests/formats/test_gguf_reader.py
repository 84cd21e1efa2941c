"""Our GGUF reader on files written by gguf-py's own writer and name map: names, config, q/k permutation."""

import copy

import pytest
import torch

from conftest import make_hf_model
from gguf_util import dequantized_state, write_gguf
from openautoglm.loader import load_model

CASES = [("llama-untied", "llama"), ("llama-tied", "llama"), ("qwen2", "qwen2"), ("glm4", "glm4")]


@pytest.mark.parametrize("hf_arch,gguf_arch", CASES)
def test_gguf_f32_matches_hf(tmp_path, hf_arch, gguf_arch):
    hf = make_hf_model(hf_arch)
    path = write_gguf(tmp_path / "m.gguf", hf, gguf_arch)
    ours, ckpt = load_model(path, progress=False)
    assert ckpt.config["model_type"] == hf.config.model_type
    ids = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0"])
def test_gguf_quantized_matches_dequantized_hf(tmp_path, qtype):
    hf = make_hf_model("llama-untied")
    path = write_gguf(tmp_path / "m.gguf", hf, "llama", qtype=qtype)
    ours, ckpt = load_model(path, progress=False, gguf_weights="float")
    assert qtype in ckpt.weight_bytes_by_storage()
    ref = copy.deepcopy(hf)
    ref.load_state_dict(dequantized_state(hf, qtype))
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hf_arch,gguf_arch", CASES)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q5_1"])
def test_gguf_native_blocks_are_gguf_py_weights(tmp_path, hf_arch, gguf_arch, qtype):
    """Loaded natively, every quantized tensor is a GGMLLinear on the file's own blocks (q/k rows un-permuted on
    the bytes for Llama), holding no float copy; on a prefill (more than GEMV_MAX_ROWS tokens, an fp32 GEMM on
    the dequantized blocks) the model equals transformers on gguf-py's dequantized weights to fp32 rounding."""
    from openautoglm import kernels
    from openautoglm.quant.modules import GEMV_MAX_ROWS, GGMLLinear

    if not kernels.load_ops():
        pytest.skip("no C++ compiler: GGUF tensors load as float")
    hf = make_hf_model(hf_arch)
    path = write_gguf(tmp_path / "m.gguf", hf, gguf_arch, qtype=qtype)
    ours, _ = load_model(path, progress=False)
    ggml = [m for m in ours.modules() if isinstance(m, GGMLLinear)]
    n_linear = sum(1 for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear))
    n_tables = 0 if hf.config.tie_word_embeddings else 1  # an untied embedding is a table of its own
    assert len(ggml) == n_linear + n_tables and all(m.qtype == qtype for m in ggml)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in ours.parameters())  # no float weight left
    for m in ggml:
        m.bf16_gemm = False
    ref = copy.deepcopy(hf)
    ref.load_state_dict(dequantized_state(hf, qtype))
    ids = torch.randint(0, 320, (2, GEMV_MAX_ROWS + 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_gguf_rope_freqs_tensor_gives_llama3_scaling(tmp_path):
    """llama.cpp writes llama3 RoPE scaling as a rope_freqs tensor (convert_hf_to_gguf's generate_extra_tensors)."""
    import numpy as np

    from openautoglm.models.config import ModelConfig
    from openautoglm.models.layers import rope_inv_freq

    hf = make_hf_model("llama3-scaled")
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    plain = ModelConfig.from_hf({**hf.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    factors = (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy().astype(np.float32)
    assert not np.allclose(factors, 1.0)  # the scaling matters at these frequencies
    path = write_gguf(tmp_path / "m.gguf", hf, "llama", extra_tensors={"rope_freqs.weight": factors})
    ours, ckpt = load_model(path, progress=False)
    assert ckpt.config["rope_scaling"]["rope_type"] == "freq_factors"
    ids = torch.randint(0, 320, (1, 150), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hf_arch,gguf_arch", CASES)
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_native_q4_loads_as_int4_on_the_files_codes(tmp_path, hf_arch, gguf_arch, qtype):
    """Q4_0/Q4_1 tensors load as int4 layers (groups of 32) on the file's codes: their dequantized weights are
    gguf-py's to within the bf16 rounding of the block scales, and the model's logits follow. Where the GGML rows
    interleave (AVX-512 VNNI, whole groups of 16 rows) they stay the file's blocks instead: gguf-py's bit for bit
    (an untied embedding's table, only gathered from, everywhere: mapped from the file, as stored)."""
    from openautoglm import kernels
    from openautoglm.quant.modules import GGMLLinear, IntxLinear

    if not kernels.load_ops():
        pytest.skip("no C++ compiler: GGUF tensors load as float")
    hf = make_hf_model(hf_arch)
    path = write_gguf(tmp_path / "m.gguf", hf, gguf_arch, qtype=qtype)
    ours, _ = load_model(path, progress=False)
    ref_model, _ = load_model(path, progress=False, gguf_weights="float")
    mods = dict(ours.named_modules())
    ints = {n: m for n, m in mods.items() if isinstance(m, IntxLinear)}
    blocks = {n: m for n, m in mods.items() if isinstance(m, GGMLLinear) and m.qtype == qtype}
    assert ints or blocks
    assert all(m.bits == 4 and m.group_size == 32 for m in ints.values())
    for name, m in blocks.items():
        if name == "model.embed_tokens.table":  # an untied embedding is only gathered from: the stored layout
            assert not m.interleaved, name
        else:
            assert m.interleaved and kernels.interleaves(qtype, m.out_features), name
        ref = ref_model.get_submodule(name.removesuffix(".table"))  # an untied embedding's table: its weight
        assert torch.equal(m.dequantized(), ref.weight), name
    for name, m in ints.items():
        if name == "model.embed_tokens.table":
            continue
        w = ref_model.get_submodule(name).weight  # gguf-py's dequantization (the float reader is bit-exact to it)
        bound = w.reshape(w.shape[0], -1, 32).abs().amax(-1, keepdim=True) * 2.0 ** -7 + 1e-8
        err = (m.dequantized() - w).reshape(w.shape[0], -1, 32).abs()
        assert bool((err <= bound).all()), name
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours(ids).float(), ref_model(ids).float()
    lp, lq = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    assert float((lp.exp() * (lp - lq)).sum(-1).mean()) < 1e-3
