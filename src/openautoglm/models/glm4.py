"""GLM-4 (HF ``model_type`` ``glm4``, e.g. GLM-4-0414): tokens -> logits.

Follows transformers' ``modeling_glm4.py``. Differences from Llama: partial rotary (``partial_rotary_factor``,
0.5) in the interleaved-pair layout, a fused ``gate_up_proj``, q/k/v biases, and two extra norms:
``post_self_attn_layernorm`` after attention and ``post_mlp_layernorm`` after the MLP, both before the
residual add.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, activation
from .llama import LlamaAttention, LlamaForCausalLM


class Glm4Attention(LlamaAttention):
    """Llama attention (q/k/v biases from the config) with RoPE on interleaved pairs."""

    rope_interleaved = True


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
