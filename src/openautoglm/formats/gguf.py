"""GGUF reader: metadata -> HF config dict, tensors -> float32 under HF names, or quantized ones as stored.

Metadata and the tensor index come from ``gguf_header.read_header`` (bounded, and 30x faster than gguf-py's
``GGUFReader`` on a 49k-token vocabulary; the tests hold the two equal). Each tensor's bytes are read from the
file into a buffer of its own when asked for (no mapping outlives the header read, so no file pages stay
resident for the checkpoint's lifetime), dequantized with ``gguf_quants``, named through ``names.py``, and the
q/k row permutation that llama.cpp's ``convert_hf_to_gguf.py`` applies to Llama checkpoints for its
interleaved RoPE kernel is undone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptModelError, UnsupportedArchitectureError, UnsupportedQuantTypeError, corrupt_on_error
from .checkpoint import Checkpoint, TensorInfo, map_owned, read_owned
from .gguf_header import read_header
from .gguf_quants import SUPPORTED_TYPES, dequantize
from .names import ARCH_TO_MODEL_TYPE, gguf_to_hf


def tensor_nbytes(type_id: int, ne: tuple[int, ...], name: str, path: Path) -> tuple[str, int]:
    """(ggml type name, bytes) of a tensor; typed errors for an unknown type or a shape its blocks do not tile."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qt = GGMLQuantizationType(type_id)
    except ValueError:
        raise CorruptModelError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
    block, tsize = GGML_QUANT_SIZES[qt]
    n_el = 1
    for d in ne:
        n_el *= d
    if n_el % block:
        raise CorruptModelError(f"{path}: tensor {name} has {n_el} elements, not a multiple of {qt.name}'s {block}")
    return qt.name, n_el // block * tsize


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: rows (n_head, 2, hd/2) were stored as (n_head, hd/2, 2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_metadata(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCH_TO_MODEL_TYPE:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r} in GGUF; supported: {', '.join(sorted(ARCH_TO_MODEL_TYPE))}"
        )

    def g(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden = int(g("embedding_length"))
    heads = int(g("attention.head_count"))
    kv = g("attention.head_count_kv", heads)
    head_dim = int(g("attention.key_length", hidden // heads))
    n_vocab = g("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    cfg = {
        "model_type": ARCH_TO_MODEL_TYPE[arch],
        "vocab_size": int(n_vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
    }
    rot = g("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        cfg["partial_rotary_factor"] = int(rot) / head_dim
    scaling = g("rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    if "tokenizer.ggml.bos_token_id" in meta:
        cfg["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if "tokenizer.ggml.eos_token_id" in meta:
        cfg["eos_token_id"] = int(meta["tokenizer.ggml.eos_token_id"])
    return cfg


def read_gguf(path: str | Path) -> Checkpoint:
    path = Path(path)
    header = read_header(path)
    with corrupt_on_error(f"{path}'s metadata or tensor index"):  # values of the wrong type
        return _read_gguf(path, header)


def _read_gguf(path: Path, header) -> Checkpoint:
    meta = header.metadata
    cfg = config_from_metadata(meta, {t.name for t in header.tensors})
    arch = meta["general.architecture"]
    infos: dict[str, TensorInfo] = {}
    by_hf = {}
    for t in header.tensors:
        qtype, nbytes = tensor_nbytes(t.type_id, t.ne, t.name, path)
        if t.offset + nbytes > header.file_size:
            raise CorruptModelError(f"{path}: tensor {t.name} ({nbytes} bytes at {t.offset}) runs past the end of "
                                    f"the file ({header.file_size} bytes); the file is truncated")
        if t.name == "rope_freqs.weight":
            # llama.cpp stores llama3-style RoPE scaling as per-frequency divisors: theta_i = pos * inv_freq_i / f_i
            raw = read_owned(path, t.offset, nbytes, f"tensor {t.name}")
            factors = dequantize(raw, qtype, (int(np.prod(t.ne)),))
            cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}
        hf = gguf_to_hf(t.name, arch)
        if hf is None:
            continue
        if qtype not in SUPPORTED_TYPES:
            raise UnsupportedQuantTypeError(
                f"tensor {t.name} uses quant type {qtype}, which is not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(reversed(t.ne))  # ggml ne is fastest-first
        infos[hf] = TensorInfo(hf, shape, qtype, nbytes)
        by_hf[hf] = (t.name, t.offset, nbytes)

    permute = cfg["model_type"] == "llama"
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def load(name: str) -> torch.Tensor:
        gguf_name, offset, nbytes = by_hf[name]
        info = infos[name]
        raw = read_owned(path, offset, nbytes, f"tensor {gguf_name}")  # no mmap outlives this reader
        w = dequantize(raw, info.storage, info.shape)
        if permute and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = unpermute_rope(w, heads)
        elif permute and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = unpermute_rope(w, kv)
        return w

    def load_raw(name: str) -> torch.Tensor:
        """A quantized tensor's blocks as stored, one row of blocks a weight row: (N, bytes a row) uint8 (rows
        are whole blocks, so the q/k row permutation is undone on the bytes, exactly). Other types: ``load``."""
        info = infos[name]
        if info.storage in ("F32", "F16", "BF16") or len(info.shape) != 2:
            return load(name)
        gguf_name, offset, nbytes = by_hf[name]
        raw = read_owned(path, offset, nbytes, f"tensor {gguf_name}").reshape(info.shape[0], -1)
        if permute and name.endswith("self_attn.q_proj.weight"):
            raw = unpermute_rope(raw, heads).contiguous()
        elif permute and name.endswith("self_attn.k_proj.weight"):
            raw = unpermute_rope(raw, kv).contiguous()
        return raw

    def map_raw(name: str) -> torch.Tensor:
        """load_raw's bytes as a private mapping of the file (a table only gathered from: an untied embedding).
        A page becomes resident when a row on it is first read, as llama.cpp's mmap'd weights do: Qwen2's 151936
        token rows (137-145 MB) cost the pages of the tokens a process actually sees."""
        info = infos[name]
        if (info.storage in ("F32", "F16", "BF16") or len(info.shape) != 2
                or permute and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight"))):
            return load_raw(name)
        _, offset, nbytes = by_hf[name]
        return map_owned(path, offset, nbytes).reshape(info.shape[0], -1)

    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return Checkpoint(
        path=path, format="gguf", config=cfg, tensors=infos, _loader=load,
        tokenizer={"kind": "gguf", "metadata": tok_meta}, metadata=meta, _raw_loader=load_raw, _map_loader=map_raw,
    )
