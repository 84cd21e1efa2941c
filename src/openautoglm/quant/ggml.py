"""GGML 4-bit blocks (Q4_0, Q4_1) as our int4 format, with no float detour: the same codes in groups of 32, the
scale and the value at code 8 in bf16.

Q4_0 stores ``w = d * (q - 8)`` and Q4_1 ``w = d * q + m`` per block of 32, with fp16 ``d`` and ``m``; ``IntxLinear``
computes ``w = (q - 8) * s + z``, so ``s = d`` and ``z = 0`` (Q4_0) or ``z = m + 8 d`` (Q4_1). The codes are the
file's own; only the scale and zero are rounded (fp16 -> bf16: a relative 2^-9 at most), which is the whole
difference from gguf-py's dequantization. The int4 layers then run O3's tuned int4 kernels (the W4A8 VNNI GEMV,
the dequantizing bf16 GEMM).
"""

from __future__ import annotations

import torch

INT4_TYPES = ("Q4_0", "Q4_1")


def int4_from_ggml(raw: torch.Tensor, qtype: str, in_features: int, bias):
    """(N, bytes a row) Q4_0/Q4_1 blocks -> an ``IntxLinear`` (4 bits, groups of 32) holding the same codes."""
    from .modules import IntxLinear

    if qtype not in INT4_TYPES:
        raise ValueError(f"{qtype} is not a 4-bit block type of groups of 32")
    N = raw.shape[0]
    head = 2 if qtype == "Q4_0" else 4
    blocks = raw.reshape(N, in_features // 32, head + 16)
    qs = blocks[..., head:]
    # ggml: weight j of a block in the low nibble of byte j, weight j + 16 in its high nibble
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(N, in_features // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)  # our layout: code k in byte k/2, the even one low (uint8 only)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(N, -1).float()
    if qtype == "Q4_0":
        z = torch.zeros_like(d)
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(N, -1).float()
        z = m + 8 * d
    return IntxLinear.from_packed(packed, d, z, 4, 32, in_features, bias)
