"""Fuse q_proj, k_proj and v_proj into one ``qkv_proj`` linear (vLLM's QKVParallelLinear, llama.cpp's
``wqkv``): one GEMM instead of three per layer. Exact up to GEMM accumulation order.

Applies to float ``nn.Linear`` projections (Llama, Qwen2 with its biases, GLM/GLM-4) and to quantized ones of
one format (their codes and qparams are concatenated: exact); mixed formats and fused attentions are left alone.
"""

from __future__ import annotations

from torch import nn

from ...models.layers import apply_rope
from ...models.llama import LlamaAttention
from ...quant.modules import cat_rows


class FusedQKVAttention(LlamaAttention):
    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        return self.o_proj(self.sdpa(q, k, v, mask))


class FusedQKVInterleavedAttention(FusedQKVAttention):
    rope_interleaved = True  # GLM layout


def apply(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        if not isinstance(mod, LlamaAttention) or isinstance(mod, FusedQKVAttention):
            continue
        fused = cat_rows([mod.q_proj, mod.k_proj, mod.v_proj])
        if fused is None:
            continue
        rope_interleaved = mod.rope_interleaved
        del mod.q_proj, mod.k_proj, mod.v_proj
        mod.qkv_proj = fused
        mod.__class__ = FusedQKVInterleavedAttention if rope_interleaved else FusedQKVAttention
        n += 1
    return n
