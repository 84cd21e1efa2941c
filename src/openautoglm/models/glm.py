"""GLM (HF ``model_type`` ``glm``, GLM-4-9B-chat-hf): GLM-4's attention and fused MLP without the two extra
post-norms. Follows transformers' ``modeling_glm.py``.
"""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .glm4 import Glm4Attention, Glm4MLP
from .layers import RMSNorm
from .llama import LlamaForCausalLM


class GlmDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Glm4Attention(cfg, layer_idx)
        self.mlp = Glm4MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GlmForCausalLM(LlamaForCausalLM):
    layer_cls = GlmDecoderLayer
    interleaved_rope = True
