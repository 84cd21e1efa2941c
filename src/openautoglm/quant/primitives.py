"""Pure quantization primitives on float weights (N, K): qparams, quantize, dequantize, bit packing.

Conventions follow torch's CPU weight-only kernels: int8 is symmetric per output channel (``w = q * s``);
int4 (and the other low bit-widths) is asymmetric per group of ``g`` input columns, stored as unsigned codes
``q in [0, 2^b)`` with a scale and a zero such that ``w = (q - 2^(b-1)) * s + z`` (``_weight_int4pack_mm``).
"""

from __future__ import annotations

import torch


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Round to the bf16 grid the kernels store qparams on, so codes are chosen against the stored grid."""
    return t.to(torch.bfloat16).float()


ROWS_PER_CHUNK = 2048  # rows quantized at a time: the float temporaries of a 49152-row table stay ~10 MB


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 codes (N, K) and float32 scales (N,), round to nearest, symmetric [-127, 127]."""
    N = w.shape[0]
    q, s = torch.empty(w.shape, dtype=torch.int8), torch.empty(N)
    for r in range(0, N, ROWS_PER_CHUNK):  # rows are independent: chunks only bound the temporaries
        c = w[r:r + ROWS_PER_CHUNK].float()
        sc = _bf16((c.abs().amax(dim=1) / 127).clamp_min(1e-12))
        q[r:r + ROWS_PER_CHUNK] = torch.round(c / sc[:, None]).clamp_(-127, 127)
        s[r:r + ROWS_PER_CHUNK] = sc
    return q, s


def dequant_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float()[:, None]


def asym_per_group(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes uint8 (N, K) in [0, 2^bits), scales and zeros float32 (N, K/group).

    Min/max per group, round to nearest: w ~ (q - mid) * s + z with mid = 2^(bits-1) and z = min + mid * s.
    """
    N, K = w.shape
    if K % group:
        raise ValueError(f"K={K} is not a multiple of the group size {group}")
    q = torch.empty(N, K, dtype=torch.uint8)
    s, z = torch.empty(N, K // group), torch.empty(N, K // group)
    for r in range(0, N, ROWS_PER_CHUNK):  # rows are independent: chunks only bound the temporaries
        g = w[r:r + ROWS_PER_CHUNK].float().reshape(-1, K // group, group)
        sc, ze = asym_qparams(g, bits)
        q[r:r + ROWS_PER_CHUNK] = quantize_asym(g, sc[..., None], ze[..., None], bits).reshape(-1, K)
        s[r:r + ROWS_PER_CHUNK], z[r:r + ROWS_PER_CHUNK] = sc, ze
    return q, s, z


def asym_qparams(g: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (the value at code ``mid``) of float groups (..., g) from their min and max."""
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1), g.amax(-1)
    s = _bf16(((hi - lo) / qmax).clamp_min(1e-12))
    return s, _bf16(lo + (1 << (bits - 1)) * s)


def quantize_asym(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` (..., n) on a given grid (``s``, ``z`` broadcast against ``w``), round to nearest."""
    mid = 1 << (bits - 1)
    return torch.round((w - z) / s + mid).clamp_(0, (1 << bits) - 1)


def int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (M, K) float -> int8 (M, K) and float32 scales (M,), symmetric."""
    x = x.float()
    s = (x.abs().amax(dim=-1) / 127).clamp_min(1e-12)
    return torch.round(x / s[:, None]).clamp_(-127, 127).to(torch.int8), s


def dequant_asym(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    N, K = q.shape
    G = s.shape[1]
    mid = 1 << (bits - 1)
    g = (q.reshape(N, G, K // G).float() - mid) * s[..., None].float() + z[..., None].float()
    return g.reshape(N, K)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) of ``bits`` bits -> (N, K*bits/8) bytes, little-endian within each byte group."""
    N, K = q.shape
    per = 8 // bits if 8 % bits == 0 else None
    if per:  # 1, 2, 4 bits: whole codes per byte
        q = q.reshape(N, K // per, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (q << shifts).sum(-1).to(torch.uint8)
    # 3 bits (or others): 8 codes -> `bits` bytes through a 64-bit word
    q = q.reshape(N, K // 8, 8).to(torch.int64)
    word = (q << (torch.arange(8, dtype=torch.int64) * bits)).sum(-1)  # (N, K/8) < 2^(8*bits)
    out = ((word[..., None] >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF).to(torch.uint8)
    return out.reshape(N, K // 8 * bits)


def unpack_bits(p: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    N = p.shape[0]
    mask = (1 << bits) - 1
    per = 8 // bits if 8 % bits == 0 else None
    if bits == 4:  # the hot case (packing int4 layers at every load): byte ops only, no int32 temporaries
        return torch.stack([p & 15, p >> 4], -1).reshape(N, K)
    if per:
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return ((p.to(torch.int32)[..., None] >> shifts) & mask).reshape(N, K).to(torch.uint8)
    b = p.reshape(N, K // 8, bits).to(torch.int64)
    word = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(-1)
    return ((word[..., None] >> (torch.arange(8, dtype=torch.int64) * bits)) & mask).reshape(N, K).to(torch.uint8)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum().clamp_min(1e-300)))
