"""The implementations O3's selector (``autotune.py``) chooses among, as modules with a linear's call signature:
each wraps one kernel (oneDNN's bf16 GEMM on a kept copy, the native dequantize-then-GEMM of ``kernels/``, our
decode GEMVs and decode attention, W8A8 ``_int_mm``), and ``TunedLinear`` holds the chosen ones per token-count
bucket. ``autotune.py`` only measures and chooses; what runs is here."""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..models.layers import attention

DECODE_MAX = 16  # token counts up to this use the decode choice


def reference(mod, x):
    """The layer's output by dequantize-then-matmul in fp32: what every candidate is measured against."""
    if hasattr(mod, "forward_reference"):
        return mod.forward_reference(x)
    return nn.functional.linear(x.float(), mod.weight.float(), None if mod.bias is None else mod.bias.float())


def _dequant_bf16(mod) -> torch.Tensor:
    w = mod.dequantized() if hasattr(mod, "dequantized") else mod.weight
    return w.detach().to(torch.bfloat16).contiguous()


class BF16Linear(nn.Module):
    """A float linear on a bf16 copy of a layer's (dequantized) weights: oneDNN's bf16 GEMM, AMX where present."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.register_buffer("weight", _dequant_bf16(mod), persistent=False)
        b = None if mod.bias is None else mod.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", b, persistent=False)

    def forward(self, x):
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class DequantBF16Linear(nn.Module):
    """A bf16 GEMM on an int4 layer's weights dequantized at each call by the native kernel (``kernels/``) into a
    reused buffer: nothing is kept beside the int4 codes, and one dequantization serves every token of a prefill
    chunk. The source layer is held outside the module tree (it is registered once, as the tuned layer's
    ``native``)."""

    dtype = torch.bfloat16
    _buffers_by_shape = threading.local()

    def __init__(self, mod: nn.Module):
        super().__init__()
        self._src = (mod,)
        b = None if mod.bias is None else mod.bias.detach().to(self.dtype)
        self.register_buffer("bias", b, persistent=False)

    def weight(self) -> torch.Tensor:
        from .. import kernels

        m = self._src[0]
        bufs = self._buffers_by_shape.__dict__.setdefault("d", {})
        key = (m.out_features, m.in_features, self.dtype)
        if key not in bufs:
            bufs[key] = torch.empty(key[:2], dtype=self.dtype)
        f = kernels.dequant_int4_bf16 if self.dtype == torch.bfloat16 else kernels.dequant_int4_f32
        return f(m.qweight, m.scales, m.zeros, m.group_size, out=bufs[key])

    def forward(self, x):
        return nn.functional.linear(x.to(self.dtype), self.weight(), self.bias).to(x.dtype)


class DequantF32Linear(DequantBF16Linear):
    """As ``DequantBF16Linear`` with fp32 weights and an fp32 GEMM: the fast one on CPUs without native bf16
    arithmetic (AVX2 only), where a bf16 GEMM runs 5-8x slower."""

    dtype = torch.float32


class GemvLinear(nn.Module):
    """Decode's weight-only GEMV (``kernels.int4_gemv`` / ``int8_gemv``) on the layer's own portable weights. The
    source layer is held outside the module tree, as in ``DequantBF16Linear``."""

    def __init__(self, mod: nn.Module, a8: bool = False):
        super().__init__()
        self._src = (mod,)
        self.a8 = a8  # int4 with int8 activations (``gemv-a8``)
        b = None if mod.bias is None else mod.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", b, persistent=False)

    def forward(self, x):
        m = self._src[0]
        x2 = x.reshape(-1, m.in_features).to(torch.bfloat16).contiguous()
        if self.a8:
            y = torch.ops.openautoglm.int4_gemv_a8(x2, m.qweight, m.scales, m.zeros, m.group_size)
        elif hasattr(m, "group_size"):
            y = torch.ops.openautoglm.int4_gemv(x2, m.qweight, m.scales, m.zeros, m.group_size)
        else:
            y = torch.ops.openautoglm.int8_gemv(x2, m.qweight, m.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], m.out_features).to(x.dtype)


class DecodeAttention(nn.Module):
    """O3's attention: the ``decode_attention`` operator (``kernels/gemv.cpp``) for one query position a row, SDPA
    for more (prefill). Replaces a layer's ``Attention``; static under compilation (the branch is on the shape)."""

    def forward(self, q, k, v, mask, scale=None):
        if q.shape[2] != 1:
            return attention(q, k, v, mask, scale)
        if isinstance(k, tuple):  # the int8 cache: codes and scales read as stored; the queries take the key
            # smoothing (q.k = (q*s).(k/s)), each query head its kv head's
            H, KV = q.shape[1], k[2].shape[0]
            qs = q.float() * k[2].repeat_interleave(H // KV, 0)[None, :, None, :]
            o = torch.ops.openautoglm.decode_attention_q8(qs, k[0], k[1], v[0], v[1], mask, scale).to(q.dtype)
        else:
            o = torch.ops.openautoglm.decode_attention(q, k, v, mask, scale)
        B, H, _, D = o.shape
        return o.reshape(B, 1, H * D)


class BlockGemmLinear(nn.Module):
    """A GGML layer's block GEMV at every row count: on the 16-row interleaved layout (``kernels/ggml.cpp``) it
    is an int8 GEMM (activations per block of 32, VNNI dot products, llama.cpp's arithmetic), ~1.4-1.8x the bf16
    GEMM on the dequantized weights on a Zen 4 without AMX. The source layer is held outside the module tree."""

    def __init__(self, mod: nn.Module):
        super().__init__()
        self._src = (mod,)

    def forward(self, x):
        m = self._src[0]
        y = torch.ops.openautoglm.ggml_gemv(x.reshape(-1, m.in_features), m.raw, m.type_id, m.in_features)
        return m._out(y, x, x.shape)


def implementations(mod) -> dict:
    """name -> (make(mod) -> module with the layer's call signature, extra bytes it holds)."""
    out = {"native": (lambda m: m, 0)}
    if type(mod).__name__ == "GGMLLinear":
        # the file's blocks are the layer: its own GEMV and dequantizing GEMM; a bf16 copy would add 2 bytes a
        # weight to a model whose point is its size. Interleaved rows also offer the GEMV as prefill's GEMM.
        if mod.interleaved:
            out["gemm-a8"] = (BlockGemmLinear, 0)
        return out
    if not (type(mod) is nn.Linear and mod.weight.dtype == torch.bfloat16):
        out["bf16"] = (BF16Linear, 2 * mod.in_features * mod.out_features)
    if type(mod).__name__ == "IntxLinear" and mod.bits == 4:
        from .. import kernels

        if kernels.available():
            out["bf16-dq"] = (DequantBF16Linear, 0)
            out["f32-dq"] = (DequantF32Linear, 0)
        if kernels.load_ops():
            out["gemv"] = (GemvLinear, 0)
            if kernels.gemv_path("int4-a8", mod.group_size):
                out["gemv-a8"] = (lambda m: GemvLinear(m, a8=True), 0)
    if type(mod).__name__ == "Int8Linear":
        from .. import kernels

        if kernels.load_ops():
            out["gemv"] = (GemvLinear, 0)
    if type(mod).__name__ == "Int8Linear":
        from ..quant.modules import Int8DynActLinear

        out["w8a8"] = (lambda m: Int8DynActLinear(m.qweight, m.scales, m.bias), 0)  # shares the int8 weights
    return out


class TunedLinear(nn.Module):
    """A linear with one implementation per token-count bucket (static under compilation: the branch is on the
    input's shape). The implementations are submodules, so everything they read is module state."""

    def __init__(self, inner: nn.Module, impls: dict[str, nn.Module], names: tuple[str, str]):
        super().__init__()
        self.impls = nn.ModuleDict({"native": inner, **{k: v for k, v in impls.items() if k != "native"}})
        self.names = names
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x):
        m = x.numel() // x.shape[-1]
        return self.impls[self.names[0] if m <= DECODE_MAX else self.names[1]](x)

    def extra_repr(self) -> str:
        return f"decode={self.names[0]}, prefill={self.names[1]}"
