"""GGUF reader: metadata -> HF config dict, tensors -> float32 under HF names.

Metadata and the tensor index come from ``gguf.GGUFReader``. Each tensor's bytes are read from the file into a
buffer of its own when asked for (the reader's memmap is dropped after indexing, so no file pages stay resident
for the checkpoint's lifetime), dequantized with ``gguf_quants``, named through ``names.py``, and the q/k row
permutation that llama.cpp's ``convert_hf_to_gguf.py`` applies to Llama checkpoints for its interleaved RoPE
kernel is undone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptModelError, UnsupportedArchitectureError, UnsupportedQuantTypeError
from .checkpoint import Checkpoint, TensorInfo, read_owned
from .gguf_quants import BLOCK_SIZES, SUPPORTED_TYPES, dequantize
from .names import ARCH_TO_MODEL_TYPE, gguf_to_hf

GGUF_MAGIC = b"GGUF"


def _open_reader(path: Path):
    from gguf import GGUFReader

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CorruptModelError(f"{path} is not a GGUF file (bad magic {magic!r}); the file is corrupt or of another format")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # gguf raises ValueError/IndexError/etc. on truncated or malformed files
        raise CorruptModelError(f"{path} is corrupt or truncated and cannot be read as GGUF ({type(e).__name__}: {e})") from None


def _field_value(field):
    try:
        return field.contents()
    except Exception:
        return None


def read_metadata(reader, skip_arrays: bool = False) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = _field_value(f)
    return meta


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
    reader = _open_reader(path)
    meta = read_metadata(reader)
    gguf_names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(meta, gguf_names)
    arch = meta["general.architecture"]
    rf = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rf is not None:
        # llama.cpp stores llama3-style RoPE scaling as per-frequency divisors: theta_i = pos * inv_freq_i / f_i
        factors = dequantize(torch.from_numpy(np.array(rf.data, copy=True).view(np.uint8)), rf.tensor_type.name,
                             (int(rf.n_elements),))
        cfg["rope_scaling"] = {"rope_type": "freq_factors", "factors": factors.tolist()}

    infos: dict[str, TensorInfo] = {}
    by_hf = {}
    for t in reader.tensors:
        qtype = t.tensor_type.name
        hf = gguf_to_hf(t.name, arch)
        if hf is None:
            continue
        if qtype not in SUPPORTED_TYPES:
            raise UnsupportedQuantTypeError(
                f"tensor {t.name} uses quant type {qtype}, which is not supported; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne is fastest-first
        block, tsize = BLOCK_SIZES[qtype]
        n_el = int(np.prod(shape))
        if n_el % block or t.data.nbytes != n_el // block * tsize:
            raise CorruptModelError(f"{path}: tensor {t.name} has {t.data.nbytes} bytes, expected {n_el // block * tsize}")
        infos[hf] = TensorInfo(hf, shape, qtype, int(t.data.nbytes))
        by_hf[hf] = (t.name, int(t.data_offset), int(t.data.nbytes))

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

    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return Checkpoint(
        path=path, format="gguf", config=cfg, tensors=infos, _loader=load,
        tokenizer={"kind": "gguf", "metadata": tok_meta}, metadata=meta,
    )
