"""Write GGUF files from HF models with gguf-py's own writer, name map and quantizers, as llama.cpp's
``convert_hf_to_gguf.py`` does (including its q/k row permutation for Llama). Used as an independent oracle
for our reader: our name table and un-permutation are never used to write."""

from __future__ import annotations

import gguf
import numpy as np

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "glm4": gguf.MODEL_ARCH.GLM4}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf_model, arch: str, qtype: str | None = None, tokenizer_meta: dict | None = None,
               extra_kv: dict | None = None, extra_tensors: dict | None = None):
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rp = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    prf = rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    w.add_rope_dimension_count(int(head_dim * prf))
    w.add_vocab_size(cfg.vocab_size)
    for k, v in (tokenizer_meta or {}).items():
        _add_kv(w, k, v)
    for k, v in (extra_kv or {}).items():
        _add_kv(w, k, v)
    names = gguf.get_tensor_name_map(ARCH[arch], cfg.num_hidden_layers)
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        data = t.detach().float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        if qtype and data.ndim == 2 and data.shape[1] % 32 == 0:
            q = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(gname, gguf.quants.quantize(data, q), raw_dtype=q)
        else:
            w.add_tensor(gname, np.ascontiguousarray(data))
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_kv(w, key, value):
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(key)


def dequantized_state(hf_model, qtype: str):
    """The HF state dict as it reads back after a round trip through ``qtype`` (for reference logits)."""
    import torch

    q = gguf.GGMLQuantizationType[qtype]
    out = {}
    for name, t in hf_model.state_dict().items():
        data = t.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            data = gguf.quants.dequantize(gguf.quants.quantize(data, q), q)
        out[name] = torch.from_numpy(np.ascontiguousarray(data))
    return out
