"""Llama family (Llama 2/3, SmolLM2): tokens -> logits.

Follows transformers' ``modeling_llama.py``: pre-norm decoder, GQA, RoPE in the HF half-split layout (GGUF's
interleaved q/k rows are undone by the reader), SwiGLU MLP, tied or untied embeddings. Module attribute names
are the HF checkpoint names. The KV cache is any object with ``begin(positions) -> mask`` and
``update(layer, k, v) -> (k_all, v_all)``; see ``runtime/kv_cache.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Attention, RMSNorm, RotaryTables, activation, apply_rope, causal_mask, from_start


class LlamaAttention(nn.Module):
    rope_interleaved = False  # RoPE pair layout: HF half-split (Llama, Qwen2) or interleaved (GLM)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.sdpa = Attention()

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.o_proj(self.sdpa(q, k, v, mask))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls=LlamaDecoderLayer, interleaved_rope: bool = False):
        super().__init__()
        # given its (uninitialised) weight, so no random init runs: on the meta device normal_ would import
        # torch's Python decompositions, ~3 s and ~75 MB at every load
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryTables(cfg, interleaved=interleaved_rope)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids (B, T), positions (B, T) | None, cache | None, logits_at (B,) | None)``.

    Returns logits (B, T, V), or (B, V) at index ``logits_at[b]`` of each row when given (skips the vocab
    projection of every other position during prefill).
    """

    layer_cls = LlamaDecoderLayer
    interleaved_rope = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, self.layer_cls, self.interleaved_rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions=None, cache=None, logits_at=None):
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        if cache is not None:
            mask = cache.begin(positions)
        else:
            mask = None if from_start(positions) else causal_mask(positions)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache)
        if logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at]  # (B, D)
        return self.lm_head(self.model.norm(h))
