"""Fuse gate_proj and up_proj of the SwiGLU MLP into one ``gate_up_proj`` linear (as GLM-4 checkpoints store
it and vLLM's MergedColumnParallelLinear does): one GEMM instead of two per layer. Float or quantized (one format for both), as in fuse_qkv."""

from __future__ import annotations

from torch import nn

from ...models.llama import LlamaMLP
from ...quant.modules import cat_rows


class FusedGateUpMLP(LlamaMLP):
    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def apply(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        if type(mod) is not LlamaMLP:
            continue
        fused = cat_rows([mod.gate_proj, mod.up_proj])
        if fused is None:
            continue
        del mod.gate_proj, mod.up_proj
        mod.gate_up_proj = fused
        mod.__class__ = FusedGateUpMLP
        n += 1
    return n
