"""The one table that maps GGUF tensor names to HF checkpoint names.

Follows gguf-py's ``tensor_mapping.py`` (read in the other direction). Block tensors are keyed by the part
after ``blk.{i}.``; an architecture may override a key where llama.cpp stores a different HF tensor under
the same GGUF name (GLM-4 stores the fused ``gate_up_proj`` as ``ffn_up``).
"""

from __future__ import annotations

TOP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
}

ARCH_BLOCK_OVERRIDES = {
    "glm4": {"ffn_up": "mlp.gate_up_proj"},
}

# GGUF general.architecture -> HF model_type, for the architectures we implement.
ARCH_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "glm4": "glm4"}

# Tensors llama.cpp writes that carry no HF weight (precomputed tables we rebuild ourselves).
IGNORED = {"rope_freqs.weight"}


def gguf_to_hf(name: str, arch: str) -> str | None:
    """HF name of GGUF tensor ``name`` (e.g. ``blk.3.attn_q.weight``), or None if it has none."""
    if name in IGNORED:
        return None
    base, _, suffix = name.rpartition(".")  # suffix: weight | bias
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        table = {**BLOCK, **ARCH_BLOCK_OVERRIDES.get(arch, {})}
        if part not in table:
            return None
        return f"model.layers.{idx}.{table[part]}.{suffix}"
    if base in TOP:
        return f"{TOP[base]}.{suffix}"
    return None
