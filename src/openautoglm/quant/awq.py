"""AWQ-style activation-aware scaling (Lin et al., 2023): scale a linear's input channels up by
``s = mean|x|^alpha`` before quantizing (the salient channels, those with large activations, get a finer grid)
and divide the producer of those channels by ``s``, so the float function is unchanged.

``search_scales`` picks alpha on a grid by the output error of the quantized linears on calibration inputs
(alpha = 0 is plain RTN, so the search never does worse than RTN on that objective). ``apply_scales`` folds
``1/s`` into the producer: an RMSNorm's weight, or the rows of the linear whose outputs feed the channels.
"""

from __future__ import annotations

import torch
from torch import nn

from . import primitives as P


def fake_quant(w: torch.Tensor, cfg) -> torch.Tensor:
    """The weights ``cfg``'s RTN quantization stores, dequantized (float32); equal to the module's
    ``dequantized()`` (the qparams are on the stored bf16 grid already)."""
    if hasattr(cfg, "bits"):
        return P.dequant_asym(*P.asym_per_group(w, cfg.bits, cfg.group_size), cfg.bits)
    return P.dequant_int8(*P.int8_per_channel(w))


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], cfgs: list, grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """x (n, K) calibration inputs shared by ``weights`` [(N_j, K)] -> (scales (K,), best error, RTN error)."""
    x = x.float()
    xmean = x.abs().mean(0)
    ref = [x @ w.float().t() for w in weights]
    best, best_s, rtn = float("inf"), torch.ones_like(xmean), None
    for r in range(grid):
        alpha = r / grid
        s = xmean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, cfg, y in zip(weights, cfgs, ref):
            wq = fake_quant(w.float() * s[None, :], cfg) / s[None, :]
            err += float((x @ wq.t() - y).pow(2).mean())
        if r == 0:
            rtn = err
        if err < best:
            best, best_s = err, s
    return best_s, best, rtn


@torch.no_grad()
def apply_scales(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor, rows: slice | None = None) -> None:
    """Consumers' input columns *= s; the producer's outputs /= s (a norm's weight, or a linear's rows
    ``rows`` and their bias)."""
    for c in consumers:
        c.weight.mul_(s[None, :].to(c.weight.dtype))
    if isinstance(producer, nn.Linear):
        rows = rows or slice(0, producer.out_features)
        producer.weight[rows].div_(s[:, None].to(producer.weight.dtype))
        if producer.bias is not None:
            producer.bias[rows].div_(s.to(producer.bias.dtype))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
