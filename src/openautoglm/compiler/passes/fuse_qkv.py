"""Fuse q_proj, k_proj and v_proj into one ``qkv_proj`` linear (vLLM's QKVParallelLinear, llama.cpp's
``wqkv``): one GEMM instead of three per layer. Exact up to GEMM accumulation order.

Applies to float ``nn.Linear`` projections (Llama, Qwen2 with its biases, GLM/GLM-4); quantized or already
fused attentions are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.layers import apply_rope, attention
from ...models.llama import LlamaAttention


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
        return self.o_proj(attention(q, k, v, mask))


class FusedQKVInterleavedAttention(FusedQKVAttention):
    rope_interleaved = True  # GLM layout


def apply(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        if not isinstance(mod, LlamaAttention) or isinstance(mod, FusedQKVAttention):
            continue
        projs = (mod.q_proj, mod.k_proj, mod.v_proj)
        if not all(type(p) is nn.Linear for p in projs):
            continue
        w = torch.cat([p.weight.detach() for p in projs], 0)
        has_b = mod.q_proj.bias is not None
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_b, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(w)
            if has_b:
                fused.bias.copy_(torch.cat([p.bias.detach() for p in projs], 0))
        fused.requires_grad_(False)
        rope_interleaved = mod.rope_interleaved
        del mod.q_proj, mod.k_proj, mod.v_proj
        mod.qkv_proj = fused
        mod.__class__ = FusedQKVInterleavedAttention if rope_interleaved else FusedQKVAttention
        n += 1
    return n
