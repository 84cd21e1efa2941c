"""GLM-4 (HF ``model_type`` ``glm4``, e.g. GLM-4-0414): tokens -> logits.

Follows transformers' ``modeling_glm4.py``. Differences from Llama: partial rotary (``partial_rotary_factor``,
0.5) in the interleaved-pair layout, a fused ``gate_up_proj``, q/k/v biases, and two extra norms:
``post_self_attn_layernorm`` after attention and ``post_mlp_layernorm`` after the MLP, both before the
residual add.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, activation, apply_rope, attention
from .llama import LlamaForCausalLM


class Glm4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, True), apply_rope(k, cos, sin, True)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.o_proj(attention(q, k, v, mask))


class Glm4MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Glm4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Glm4Attention(cfg, layer_idx)
        self.mlp = Glm4MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask, cache))
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


class Glm4ForCausalLM(LlamaForCausalLM):
    layer_cls = Glm4DecoderLayer
    interleaved_rope = True
