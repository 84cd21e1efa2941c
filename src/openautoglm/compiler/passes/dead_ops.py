"""Dead-op removal: drop work whose result nothing reads, and ops that do nothing.

- Unit scales: an RMSNorm whose weight is all ones (after folding, or as checkpoints sometimes ship them)
  multiplies by one: it becomes the unweighted norm (the multiply is removed).
- Zero biases: a linear whose bias is all zeros adds nothing: the bias is dropped (Qwen2/GLM checkpoints
  carry zero biases on some projections).

Exact: every removed op was the identity on its input.
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.layers import RMSNorm
from .fold_rmsnorm import UnweightedRMSNorm


def apply(model: nn.Module) -> int:
    n = 0
    for mod in list(model.modules()):
        if type(mod) is RMSNorm and torch.all(mod.weight == 1):
            del mod.weight
            mod.__class__ = UnweightedRMSNorm
            n += 1
        elif isinstance(mod, nn.Linear) and mod.bias is not None and not torch.any(mod.bias):
            mod.bias = None
            n += 1
        elif hasattr(mod, "bias") and isinstance(getattr(mod, "bias", None), nn.Parameter) \
                and type(mod) is not nn.Linear and hasattr(mod, "qweight") and not torch.any(mod.bias):
            mod.bias = None  # quantized linears
            n += 1
    return n
