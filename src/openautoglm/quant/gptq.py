"""GPTQ (Frantar et al., 2022): quantize a weight column by column and push each column's error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = E[x x^T]).

Pure function of (W, H, config). Follows the reference algorithm: Cholesky of the damped inverse Hessian,
lazy block updates. ``act_order`` visits columns by decreasing Hessian diagonal; with groups it uses static
groups (qparams chosen per original group before the pass, as AutoGPTQ's ``static_groups``), so the stored
layout stays the plain contiguous-group one the kernels read.
"""

from __future__ import annotations

import torch

from . import primitives as P


def hessian_update(H: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Accumulate x^T x (float64) over the rows of ``x`` (..., K)."""
    x = x.reshape(-1, x.shape[-1]).double()
    xtx = x.t() @ x
    return xtx if H is None else H + xtx


def gptq(W: torch.Tensor, H: torch.Tensor, cfg, act_order: bool = False, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) weight, (K, K) Hessian -> codes and qparams as the config's RTN returns them.

    int8 / w8a8: int8 codes (N, K) and scales (N,). intx: uint8 codes (N, K), scales and zeros (N, K/g).
    """
    W = W.detach().float().clone()
    N, K = W.shape
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    intx = hasattr(cfg, "bits")
    g = cfg.group_size if intx else K
    G = K // g
    if intx:
        lo_code, hi_code = 0, (1 << cfg.bits) - 1
        S = torch.zeros(N, G)
        Z = torch.zeros(N, G)
        if act_order:  # static groups: qparams from the weights as they are, per original group
            S, Z = P.asym_qparams(W.reshape(N, G, g), cfg.bits)
    else:
        lo_code, hi_code = -127, 127
        _, S = P.int8_per_channel(W)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    codes = torch.zeros(N, K, dtype=torch.int16)
    block = max(block, g if not act_order else 1)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            w = W1[:, i]
            if intx:
                gi = col // g
                if not act_order and col % g == 0:  # the group starts here: qparams from its updated weights
                    S[:, gi], Z[:, gi] = P.asym_qparams(W1[:, i:i + g], cfg.bits)
                s, z = S[:, gi], Z[:, gi]
                q = P.quantize_asym(w, s, z, cfg.bits)
                dq = (q - (1 << (cfg.bits - 1))) * s + z
            else:
                q = torch.round(w / S).clamp_(lo_code, hi_code)
                dq = q * S
            codes[:, col] = q.to(torch.int16)
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if intx:
        return codes.to(torch.uint8), S, Z
    return codes.to(torch.int8), S, None
