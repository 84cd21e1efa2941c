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
    ours, ckpt = load_model(path, progress=False)
    assert qtype in ckpt.weight_bytes_by_storage()
    ref = copy.deepcopy(hf)
    ref.load_state_dict(dequantized_state(hf, qtype))
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
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
