"""Pieces shared by the architecture files: RMSNorm, RoPE tables and their two rotation styles, attention.

Numerics follow transformers' modeling code (RMSNorm in float32, RoPE frequencies as in
``modeling_rope_utils``) so that fp32 logits match it to ~1e-5. The RoPE cos/sin tables are computed once
at build time for the whole context (constant-folded), and indexed by position in ``forward``.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return ACTIVATIONS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,), with linear or llama3 scaling as transformers computes them."""
    dim = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    kind = sc.get("rope_type")
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "freq_factors":  # GGUF rope_freqs: llama.cpp divides each frequency by its factor
        f = torch.tensor(sc["factors"], dtype=torch.float32)
        if f.numel() != inv.numel():
            raise ValueError(f"rope freq factors: {f.numel()} values for {inv.numel()} frequencies")
        return inv / f
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, inv_l)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, freq_factors)")


class RotaryTables(nn.Module):
    """cos/sin tables for every position of the context, (max_pos, rotary_dim).

    ``interleaved=False``: HF/NeoX layout, frequencies repeated as two halves (Llama, Qwen2).
    ``interleaved=True``: pairs (2i, 2i+1) share frequency i (GLM).
    """

    def __init__(self, cfg: ModelConfig, interleaved: bool = False):
        super().__init__()
        self.cfg, self.interleaved = cfg, interleaved
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def init_buffers(self, device=None) -> None:
        inv = rope_inv_freq(self.cfg)
        pos = torch.arange(self.cfg.max_position_embeddings, dtype=torch.int64).float()
        freqs = pos[:, None] * inv[None, :]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def forward(self, positions: torch.Tensor):
        # (B, T) -> (B, 1, T, rd), broadcast over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_interleaved(x):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x (B, H, T, hd); the rest pass through (partial rotary)."""
    rd = cos.shape[-1]
    rot = _rotate_interleaved if interleaved else _rotate_half
    if rd == x.shape[-1]:
        return (x * cos) + (rot(x) * sin)
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat(((xr * cos) + (rot(xr) * sin), xp), dim=-1)


def causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """Mask for a forward without cache: query t sees key j iff pos[j] <= pos[t]. (B, 1, T, T) bool."""
    return positions[:, None, None, :] <= positions[:, None, :, None]


def from_start(positions: torch.Tensor) -> bool:
    """Whether every row of a multi-token step is at positions 0..T-1 (a prompt, or its first chunk): its keys are
    then exactly this step's own, in order, and the mask is plain causal (``mask=None`` for :func:`attention`)."""
    B, T = positions.shape
    return T > 1 and bool((positions == torch.arange(T, device=positions.device)).all())


# the int8 KV cache's format (runtime/kv_cache.py), here because the attention reads it
def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> int8 codes (..., D) and fp16 scales (...): scale = max|x| / 127 rounded to fp16, codes =
    round(x / scale) clamped to [-127, 127] (an all-zero vector: scale 0, codes 0)."""
    xf = x.float()
    scales = (xf.abs().amax(-1) / 127).clamp(max=65504.0).to(torch.float16)
    s = scales.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(xf / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return codes, scales


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes x scales in fp32 (float64 if asked), then ``dtype``."""
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(ct) * scales.to(ct).unsqueeze(-1)).to(dtype)


CAUSAL_CHUNK = 128  # queries a causal attention call takes at a time (see attention)

_INVARIANT = threading.local()


@contextlib.contextmanager
def batch_invariant(on: bool = True):
    """Within: every attention over a KV cache computes each query as the decode attention operator computes it
    alone (one query, its own keys in a fixed order), so a query's output is the same bit for bit whatever
    batch, prompt chunking, cached prefix or attended length it runs with (the server: concurrent == alone,
    prefix cache on == off). Prompts read their own keys back from the cache too (``KVCache.begin``). Slower
    prefill attention (no GEMMs over queries); where the operator is missing, nothing changes."""
    was = getattr(_INVARIANT, "on", False)
    _INVARIANT.on = on
    try:
        yield
    finally:
        _INVARIANT.on = was


def invariant() -> bool:
    return getattr(_INVARIANT, "on", False)


def _decode_op(int8: bool = False):
    try:
        return torch.ops.openautoglm.decode_attention_q8 if int8 else torch.ops.openautoglm.decode_attention
    except (AttributeError, RuntimeError):
        return None


def _per_query(op, q, k, v, mask, scale):
    """q (B, H, T, hd) over k/v (B, KV, S, hd) and mask (B, 1, T, S): each query on its own (batch_invariant)."""
    B, H, T, D = q.shape
    if isinstance(k, tuple):  # the int8 cache: codes and scales read as stored, the queries take the key smoothing
        # (as O3's DecodeAttention computes a decode step)
        KV = k[2].shape[0]
        qs = q.float() * k[2].repeat_interleave(H // KV, 0)[None, :, None, :]
        kv = (k[0], k[1], v[0], v[1])
    else:
        qs, kv = q, (k, v)

    def call(qq, rows, m):  # (int8: the operator answers in fp32)
        ts = kv if T == 1 else tuple(t[rows].expand(qq.shape[0], *t.shape[1:]) for t in kv)
        return op(qq, *ts, m, scale).to(q.dtype)

    if T == 1:
        return call(qs, slice(None), mask).reshape(B, 1, H * D)
    out = []
    for b in range(B):  # a row's T queries as T rows of one query, over that row's keys (a stride-0 batch)
        qb = qs[b].transpose(0, 1).reshape(T, H, 1, D)
        out.append(call(qb, slice(b, b + 1), mask[b, 0][:, None, None, :]).reshape(1, T, H * D))
    return torch.cat(out)


def attention(q, k, v, mask, scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, KV, S, hd) (or the int8 cache's (codes, scales) pairs), mask (B, 1, T, S) bool
    -> (B, T, H*hd).

    ``mask=None``: k/v are the T positions of q themselves, attended causally, instead of a mask over the whole
    planned cache (SmolLM2, a 256-token prompt over a 512-slot plan: 47 -> 30 ms of attention a prefill)."""
    if mask is not None and q.device.type == "cpu" and invariant() and not torch.compiler.is_compiling():
        op = _decode_op(isinstance(k, tuple))  # (the operators are CPU code)
        if op is not None:
            return _per_query(op, q, k, v, mask, scale)
    if isinstance(k, tuple):  # the int8 cache's (codes, scales, key smoothing) and (codes, scales)
        sm = k[2][None, :, None, :]
        k, v = (dequantize_kv(k[0], k[1], torch.float32) * sm).to(q.dtype), dequantize_kv(*v, q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if k.dtype != q.dtype:  # a cache stored narrower than the activations
        k, v = k.to(q.dtype), v.to(q.dtype)
    B, H, T, D = q.shape
    if T == 1 and B > 1 and mask is not None and not torch.compiler.is_compiling():
        # decode, eager: one call a row, so a row's output is bit for bit what it is alone (torch's SDPA blocks a
        # batch differently from one row: ~1e-9 apart, which int8-quantized activations downstream amplify into
        # different greedy tokens). Compiled steps trace SDPA or O3's decode attention operator as they are.
        return torch.cat([attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1], scale) for i in range(B)])
    if mask is not None or T <= CAUSAL_CHUNK:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale,
                                           enable_gqa=gqa)
        return o.transpose(1, 2).reshape(B, T, H * D)
    # causal, in chunks of queries: chunk [i0, i1) attends to keys [0, i1) only. torch's CPU flash attention skips
    # work above the diagonal only in blocks of 512 keys, so one call computes (then masks) every score of a prompt
    # up to 512 tokens; chunking skips them (SmolLM2 512-token prefill 381 -> 353 ms; 256 tokens within noise)
    out = q.new_empty(B, T, H, D)
    for i0 in range(0, T, CAUSAL_CHUNK):
        i1 = min(T, i0 + CAUSAL_CHUNK)
        m = None if i0 == 0 else torch.arange(i1, device=q.device) <= torch.arange(i0, i1, device=q.device)[:, None]
        out[:, i0:i1] = F.scaled_dot_product_attention(q[:, :, i0:i1], k[:, :, :i1], v[:, :, :i1], attn_mask=m,
                                                       is_causal=i0 == 0, scale=scale, enable_gqa=gqa).transpose(1, 2)
    return out.view(B, T, H * D)


class Attention(nn.Module):
    """:func:`attention` as a module (no state), so that the compiler can swap its kernel (O3's decode attention)
    the way it swaps linears'."""

    def forward(self, q, k, v, mask, scale: float | None = None) -> torch.Tensor:
        return attention(q, k, v, mask, scale)
