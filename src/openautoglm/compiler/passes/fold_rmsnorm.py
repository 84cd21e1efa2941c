"""Fold an RMSNorm's weight into the linears that read its output: W @ (g * n(x)) == (W * g) @ n(x).

Exact in real arithmetic (one rounding moves from the activation to the weight). Applied where the norm feeds
only float linears: a decoder layer's ``input_layernorm`` (-> q/k/v or the fused qkv) and
``post_attention_layernorm`` (-> gate/up or the fused gate_up); the final norm feeds ``lm_head`` only
when the head is not tied to the embeddings. GLM-4's post-sublayer norms feed the residual and are left alone.
The folded norm keeps no weight (the multiply is removed, not done by ones).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.layers import RMSNorm


class UnweightedRMSNorm(RMSNorm):
    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt)


def _fold(norm: RMSNorm, linears: list[nn.Linear]) -> bool:
    if type(norm) is not RMSNorm or not linears or any(type(l) is not nn.Linear for l in linears):
        return False
    g = norm.weight.detach().float()
    with torch.no_grad():
        for l in linears:
            l.weight.copy_((l.weight.float() * g[None, :]).to(l.weight.dtype))
    del norm.weight
    norm.__class__ = UnweightedRMSNorm
    return True


def _readers(mod: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    return [getattr(mod, n) for n in names if hasattr(mod, n)]


def apply(model: nn.Module) -> int:
    n = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n += _fold(layer.input_layernorm, _readers(attn, ("qkv_proj",)) or _readers(attn, ("q_proj", "k_proj", "v_proj")))
        # in every supported layer (GLM-4's included) post_attention_layernorm feeds only the MLP input
        n += _fold(layer.post_attention_layernorm,
                   _readers(mlp, ("gate_up_proj",)) or _readers(mlp, ("gate_proj", "up_proj")))
    lm = getattr(model, "lm_head", None)
    if lm is not None and type(lm) is nn.Linear and lm.weight is not model.model.embed_tokens.weight:
        n += _fold(model.model.norm, [lm])
    return n
