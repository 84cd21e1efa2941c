"""Fuse gate_proj and up_proj of the SwiGLU MLP into one ``gate_up_proj`` linear (as GLM-4 checkpoints store
it and vLLM's MergedColumnParallelLinear does): one GEMM instead of two per layer."""

from __future__ import annotations

import torch
from torch import nn

from ...models.llama import LlamaMLP


class FusedGateUpMLP(LlamaMLP):
    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def apply(model: nn.Module) -> int:
    n = 0
    for mod in model.modules():
        if type(mod) is not LlamaMLP:
            continue
        if not (type(mod.gate_proj) is nn.Linear and type(mod.up_proj) is nn.Linear):
            continue
        w = torch.cat([mod.gate_proj.weight.detach(), mod.up_proj.weight.detach()], 0)
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(w)
        fused.requires_grad_(False)
        del mod.gate_proj, mod.up_proj
        mod.gate_up_proj = fused
        mod.__class__ = FusedGateUpMLP
        n += 1
    return n
