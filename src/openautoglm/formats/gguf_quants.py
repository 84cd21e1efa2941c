"""Dequantization of GGML block quant types, in torch.

One function per type, each a vectorized port of the reference formulas in gguf-py's ``quants.py`` (itself a
port of ggml-quants.c). The operations are done in the same order and in float32, so the results are
bit-exact against ``gguf.quants.dequantize``; ``tests/formats/test_gguf_quants.py`` pins that.

Input: raw bytes as a uint8 tensor of shape ``(n_blocks, type_size)``. Output: float32 ``(n_blocks, block_size)``.
"""

from __future__ import annotations

import torch

QK_K = 256

# name -> (block_size, type_size); the subset of GGML_QUANT_SIZES we support.
BLOCK_SIZES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q5_0": (32, 2 + 4 + 16),
    "Q5_1": (32, 2 + 2 + 4 + 16),
    "Q8_0": (32, 2 + 32),
    "Q2_K": (256, 2 + 2 + QK_K // 16 + QK_K // 4),
    "Q3_K": (256, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (256, 2 + 2 + QK_K // 2 + 12),
    "Q5_K": (256, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (256, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32, through float16 (exact)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, n: int) -> torch.Tensor:
    """(n, 16) packed nibbles -> (n, 32): low nibbles first, then high (ggml's layout)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, -1)


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) single bits, least significant first (a little-endian bit mask)."""
    sh = torch.arange(8, dtype=torch.uint8)
    return ((b.reshape(n, -1, 1) >> sh) & 1).reshape(n, -1)


def dq_f32(b):
    return b.contiguous().view(torch.float32).reshape(b.shape[0], -1)


def dq_f16(b):
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(b.shape[0], -1)


def dq_bf16(b):
    return b.contiguous().view(torch.bfloat16).to(torch.float32).reshape(b.shape[0], -1)


def dq_q4_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], n).to(torch.int8) - 8
    return d * q.to(torch.float32)


def dq_q4_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], n).to(torch.float32)
    return (d * q) + m


def dq_q5_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    qh = _bits(b[:, 2:6], n)
    ql = _nibbles(b[:, 6:], n)
    q = (ql | (qh << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def dq_q5_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qh = _bits(b[:, 4:8], n)
    ql = _nibbles(b[:, 8:], n)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q) + m


def dq_q8_0(b):
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return x * d


def dq_q2_k(b):
    n = b.shape[0]
    scales, qs = b[:, : QK_K // 16], b[:, QK_K // 16 : QK_K // 16 + QK_K // 4]
    d, dmin = _f16(b[:, -4:-2]), _f16(b[:, -2:])
    dl = (d * (scales & 0xF).to(torch.float32)).reshape(n, QK_K // 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, QK_K // 16, 1)
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, -1, 1, 32) >> shift) & 3).reshape(n, QK_K // 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, -1)


def dq_q3_k(b):
    n = b.shape[0]
    hmask, qs = b[:, : QK_K // 8], b[:, QK_K // 8 : QK_K // 8 + QK_K // 4]
    sc = b[:, QK_K // 8 + QK_K // 4 : -2]
    d = _f16(b[:, -2:])
    lsc = (sc[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)).reshape(n, 16)
    hsc = (sc[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)).reshape(n, 16)
    scales = ((lsc & 0x0F) | ((hsc & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * scales.to(torch.float32)).reshape(n, 16, 1)
    ql = qs.reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = hmask.reshape(n, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    ql = ql.reshape(n, 16, QK_K // 16) & 3
    qh = (qh.reshape(n, 16, QK_K // 16) & 1) ^ 1  # the offset is zero when the mask bit is set
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor):
    """12 bytes of packed 6-bit scales and mins (Q4_K / Q5_K) -> two (n, 8) uint8."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dq_q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    qs = b[:, 16:].reshape(n, -1, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, -1, 32).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def dq_q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16 : 16 + QK_K // 8], b[:, 16 + QK_K // 8 :]
    d = (d * sc.to(torch.float32)).reshape(n, -1, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, -1, 1)
    ql = qs.reshape(n, -1, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    qh = qh.reshape(n, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 1, 8, 1)
    ql = (ql & 0x0F).reshape(n, -1, 32)
    qh = (qh & 1).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (d * q - dm).reshape(n, QK_K)


def dq_q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, : QK_K // 2], b[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4 : -2].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(b[:, -2:])
    d = (d * scales).reshape(n, QK_K // 16, 1)
    ql = ql.reshape(n, -1, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, -1, 32)
    qh = qh.reshape(n, -1, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, -1, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    q = q.reshape(n, QK_K // 16, -1).to(torch.float32)
    return (d * q).reshape(n, QK_K)


DEQUANTIZERS = {
    "F32": dq_f32, "F16": dq_f16, "BF16": dq_bf16,
    "Q4_0": dq_q4_0, "Q4_1": dq_q4_1, "Q5_0": dq_q5_0, "Q5_1": dq_q5_1, "Q8_0": dq_q8_0,
    "Q2_K": dq_q2_k, "Q3_K": dq_q3_k, "Q4_K": dq_q4_k, "Q5_K": dq_q5_k, "Q6_K": dq_q6_k,
}

SUPPORTED_TYPES = tuple(DEQUANTIZERS)


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], chunk_blocks: int = 1 << 16) -> torch.Tensor:
    """Dequantize raw GGUF tensor bytes of type ``qtype`` into a float32 tensor of ``shape`` (row-major)."""
    block, tsize = BLOCK_SIZES[qtype]
    flat = raw.reshape(-1)
    n_blocks = flat.numel() // tsize
    blocks = flat[: n_blocks * tsize].reshape(n_blocks, tsize)
    fn = DEQUANTIZERS[qtype]
    out = torch.empty(n_blocks, block, dtype=torch.float32)
    for s in range(0, n_blocks, chunk_blocks):  # bounded temporaries on large tensors
        out[s : s + chunk_blocks] = fn(blocks[s : s + chunk_blocks])
    return out.reshape(shape)
