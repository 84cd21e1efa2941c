"""Quantized layers on torch's CPU kernels, each with a dequantize-then-matmul reference (``forward_reference``).

- ``Int8Linear``: int8 weights per channel on ``_weight_int8pack_mm`` (bf16 activations).
- ``IntxLinear``: int2/int3/int4 weights per group, stored bit-packed, all run on
  ``_weight_int4pack_mm_for_cpu``: a b-bit code ``q`` with ``w = (q - 2^(b-1)) * s + z`` is the 4-bit code ``q``
  moved up by ``8 - 2^(b-1)`` (the same weights, exactly). The int4 packed layout depends on the CPU, so it is built at first use.
- ``Int8DynActLinear`` (W8A8): int8 weights per channel, activations quantized per token at run time,
  int8 x int8 -> int32 on ``torch._int_mm``.
- ``QuantEmbedding``: an embedding whose rows are read (dequantized) from one of the above; with tied
  embeddings it is the quantized ``lm_head`` itself, so the shared tensor is stored once.

Scales and zeros are stored in bf16, the precision the kernels consume, so the reference path dequantizes
exactly the weights the kernel uses. The weight-only kernels are vectorized for bf16 activations only, so
inputs are cast to bf16 for the matmul and the output back to the caller's dtype.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..models.layers import invariant
from . import primitives as P


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte boundary, copied only if it is not (the int8 kernel crashes on misaligned
    memory, e.g. a tensor inside an mmap)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _bias(bias):
    return None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)


class _QuantLinear(nn.Module):
    def forward_reference(self, x):
        return nn.functional.linear(x.float(), self.dequantized(), None if self.bias is None else self.bias.float())

    def _out(self, y, x, shape):
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.config.name}"


class Int8Linear(_QuantLinear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        from .config import Int8WeightOnlyConfig

        self.config = Int8WeightOnlyConfig()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", _aligned(qweight.to(torch.int8)))
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # (N,), as the kernel takes them
        self.bias = _bias(bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias, cfg) -> "Int8Linear":
        return cls(*P.int8_per_channel(w.detach()), bias)

    def dequantized(self) -> torch.Tensor:
        return P.dequant_int8(self.qweight, self.scales)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].float() * self.scales[idx].float()[..., None]

    def forward(self, x):
        shape = x.shape
        # the kernel needs a fresh contiguous bf16 input (it crashes on strided or misaligned ones)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous().clone()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales.to(torch.bfloat16))
        return self._out(y, x, shape)


class IntxLinear(_QuantLinear):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None):
        super().__init__()
        from .config import IntxWeightOnlyConfig

        self.config = IntxWeightOnlyConfig(bits, group_size)
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", P.pack_bits(codes.to(torch.uint8), bits))  # portable (N, K*bits/8)
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # (N, K/g)
        self.register_buffer("zeros", zeros.to(torch.bfloat16).contiguous())  # value at code 2^(bits-1)
        self.bias = _bias(bias)
        # the CPU-specific pack for the int4 kernel (built at load, never saved): module state, so that it moves
        # with the module and ahead-of-time compiled code can take it as an input
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("packed_sz", None, persistent=False)

    @classmethod
    def from_packed(cls, packed, scales, zeros, bits: int, group_size: int, in_features: int, bias) -> "IntxLinear":
        m = cls(torch.zeros(0, in_features, dtype=torch.uint8), scales[:0], zeros[:0], bits, group_size, bias)
        m.qweight = packed.contiguous()
        m.scales, m.zeros = scales.to(torch.bfloat16).contiguous(), zeros.to(torch.bfloat16).contiguous()
        m.out_features = packed.shape[0]
        return m

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias, cfg) -> "IntxLinear":
        q, s, z = P.asym_per_group(w.detach(), cfg.bits, cfg.group_size)
        return cls(q, s, z, cfg.bits, cfg.group_size, bias)

    def codes(self) -> torch.Tensor:
        return P.unpack_bits(self.qweight, self.bits, self.in_features)

    def dequantized(self) -> torch.Tensor:
        return P.dequant_asym(self.codes(), self.scales, self.zeros, self.bits)

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        q = P.unpack_bits(self.qweight[flat], self.bits, self.in_features)
        w = P.dequant_asym(q, self.scales[flat], self.zeros[flat], self.bits)
        return w.reshape(*idx.shape, self.in_features)

    def _pack(self):
        # centre the b-bit codes on the 4-bit kernel's 8: (q + 8 - mid - 8) * s + z == (q - mid) * s + z exactly
        codes = self.codes().to(torch.int32) + (8 - (1 << (self.bits - 1)))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.packed = packed
        self.packed_sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)

    def forward(self, x):
        if self.packed is None:
            self._pack()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.packed_sz)
        return self._out(y, x, shape)


class Int8DynActLinear(_QuantLinear):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        from .config import Int8DynActInt8WeightConfig

        self.config = Int8DynActInt8WeightConfig()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", _aligned(qweight.to(torch.int8)))
        self.register_buffer("scales", scales.to(torch.bfloat16).contiguous())  # (N,)
        self.bias = _bias(bias)

    from_weight = Int8Linear.__dict__["from_weight"]
    dequantized = Int8Linear.dequantized
    dequantize_rows = Int8Linear.dequantize_rows

    def forward(self, x):
        shape = x.shape
        xq, xs = P.int8_per_token(x.reshape(-1, self.in_features))
        acc = torch._int_mm(xq, self.qweight.t())  # int32 (M, N), exact
        y = acc.float() * xs[:, None] * self.scales.float()[None, :]
        return self._out(y, x, shape)

    def forward_reference(self, x):
        xq, xs = P.int8_per_token(x.reshape(-1, self.in_features))
        xd = (xq.float() * xs[:, None]).reshape(*x.shape[:-1], self.in_features)
        return super().forward_reference(xd)


GEMV_MAX_ROWS = 16  # token counts up to this take the GEMV; more dequantize once and run a GEMM


class GGMLLinear(_QuantLinear):
    """A linear on GGML block weights held exactly as the GGUF file stores them (``raw``: (N, bytes a row)), so
    a GGUF model's quantized tensors load with no conversion and no float copy, and a token reads the bytes
    llama.cpp reads. Decode's few rows run ``ggml_gemv`` (integer dot products on the blocks, activations in
    int8 per block of 32, llama.cpp's arithmetic); more rows dequantize the matrix once per call
    (``ggml_dequant``, bit for bit gguf-py's values) into a bf16 GEMM where the CPU multiplies bf16 natively, an
    fp32 one elsewhere. The reference path dequantizes with ``formats.gguf_quants`` (torch, no native code)."""

    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None,
                 interleaved: bool = False, owned: bool = False, gathered_only: bool = False):
        """``raw`` as the GGUF file stores it, or already ``interleaved``. Where the decode GEMV computes on the
        16-row interleaved layout (``kernels.interleaves``), stored rows are rearranged into it: in place when
        ``raw`` is ``owned`` (the loader's own buffer: no second copy of the weights at any time), else a copy.
        ``gathered_only``: a table whose rows are only gathered (an untied embedding) keeps the stored layout,
        and ``raw`` is never written (it may be a mapping of the file)."""
        super().__init__()
        from .. import kernels
        from ..host import native_bf16
        from .config import GGMLConfig

        if qtype not in kernels.GGML_TYPES:
            raise ValueError(f"no kernel computes on {qtype}; kernels: {', '.join(kernels.GGML_TYPES)}")
        self.config = GGMLConfig(qtype)
        self.out_features, self.in_features = raw.shape[0], in_features
        raw = raw.contiguous()
        if not interleaved and not gathered_only and kernels.interleaves(qtype, raw.shape[0]):
            raw, interleaved = kernels.ggml_interleave(raw, qtype, in_features, inplace=owned), True
        self.qtype, self.interleaved, self.type_id = qtype, interleaved, kernels.ggml_type_id(qtype, interleaved)
        self.register_buffer("raw", raw)
        self.bias = _bias(bias)
        self.bf16_gemm = native_bf16()

    def stored_rows(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``idx`` (all by default) of the blocks as the GGUF file stores them, whatever the layout held."""
        if not self.interleaved:
            return self.raw if idx is None else self.raw[idx]
        from ..kernels import ggml_rows

        return ggml_rows(self.raw, self.qtype, self.in_features, idx, interleaved=True)

    def dequantized(self) -> torch.Tensor:
        from ..formats.gguf_quants import dequantize

        return dequantize(self.stored_rows(), self.qtype, (self.out_features, self.in_features))

    def dequantize_rows(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = torch.ops.openautoglm.ggml_rows(self.raw, self.type_id, self.in_features, flat)
        w = torch.ops.openautoglm.ggml_dequant(rows, self.type_id & 255, self.in_features, 0)
        return w.reshape(*idx.shape, self.in_features)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        # interleaved rows take the int8 kernel at any row count where a query must compute as it would alone (the
        # server, batch_invariant): a prompt chunk of <= 16 tokens would otherwise differ from a longer one
        if x2.shape[0] <= GEMV_MAX_ROWS or (self.interleaved and invariant()):
            y = torch.ops.openautoglm.ggml_gemv(x2, self.raw, self.type_id, self.in_features)
        else:
            w = _workspace(self.out_features, self.in_features, torch.bfloat16 if self.bf16_gemm else torch.float32)
            if w is None:
                w = torch.ops.openautoglm.ggml_dequant(self.raw, self.type_id, self.in_features, int(self.bf16_gemm))
            else:
                torch.ops.openautoglm.ggml_dequant_out(self.raw, self.type_id, self.in_features, w)
            y = nn.functional.linear(x2.to(w.dtype), w)
        return self._out(y, x, shape)


_WORKSPACE = threading.local()
WORKSPACE_MAX = 1 << 25  # elements (64 MB of bf16): a larger matrix (a logits head over every position) allocates


def _workspace(n: int, k: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An (n, k) buffer of this thread's, reused by every layer's prefill dequantization (the largest matrix's
    size, kept), or None (while tracing, or past ``WORKSPACE_MAX``): a fresh allocation that large is mapped,
    faulted in and zeroed page by page at every call, which cost about as much as the dequantization itself."""
    if n * k > WORKSPACE_MAX or torch.compiler.is_compiling():
        return None
    buf = _WORKSPACE.__dict__.get(dtype)
    if buf is None or buf.numel() < n * k:
        buf = _WORKSPACE.__dict__[dtype] = torch.empty(n * k, dtype=dtype)
    return buf[: n * k].view(n, k)


class QuantEmbedding(nn.Module):
    """Embedding rows dequantized from a quantized (V, D) table. ``tied``: the table is the model's quantized
    ``lm_head`` (not registered here, so it is stored and moved once)."""

    def __init__(self, table: _QuantLinear, tied: bool):
        super().__init__()
        self.tied = tied
        if tied:
            self._table = (table,)
        else:
            self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("_dtype", torch.zeros(0), persistent=False)  # follows model.to(dtype)

    @property
    def qtable(self) -> _QuantLinear:
        return self._table[0] if self.tied else self.table

    def forward(self, ids):
        return self.qtable.dequantize_rows(ids).to(self._dtype.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtable.config.name}, tied={self.tied}"


MODULES = {"int8": Int8Linear, "int4": IntxLinear, "int3": IntxLinear, "int2": IntxLinear, "w8a8": Int8DynActLinear}


def quantized_linear(w: torch.Tensor, bias, cfg) -> _QuantLinear:
    return MODULES[cfg.scheme].from_weight(w, bias, cfg)


def from_qparams(cfg, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bias) -> _QuantLinear:
    """The module for codes and qparams computed elsewhere (GPTQ): int8/w8a8 take (q, s), intx (q, s, z)."""
    if cfg.scheme in ("int8", "w8a8"):
        return MODULES[cfg.scheme](q, s, bias)
    return IntxLinear(q, s, z, cfg.bits, cfg.group_size, bias)


def cat_rows(mods: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs side by side (they read the same input): float
    linears -> an ``nn.Linear``; quantized layers of one config -> that module on the concatenated codes and
    qparams (rows are independent in every format here). None when they cannot be merged."""
    if all(type(m) is nn.Linear for m in mods):
        w = torch.cat([m.weight.detach() for m in mods], 0)
        has_b = mods[0].bias is not None
        if any((m.bias is not None) != has_b for m in mods):
            return None
        fused = nn.Linear(w.shape[1], w.shape[0], bias=has_b, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(w)
            if has_b:
                fused.bias.copy_(torch.cat([m.bias.detach() for m in mods], 0))
        return fused.requires_grad_(False)
    t = type(mods[0])
    if t not in (Int8Linear, IntxLinear, Int8DynActLinear, GGMLLinear) or any(type(m) is not t or m.config != mods[0].config
                                                                  for m in mods):
        return None
    biases = [m.bias for m in mods]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    if t is GGMLLinear:  # rows are whole blocks: the stored rows concatenate as they are
        if any(m.in_features != mods[0].in_features for m in mods):
            return None
        if any(m.interleaved != mods[0].interleaved for m in mods):
            return None
        # interleaved groups of 16 rows concatenate as whole groups too
        from ..sysmem import empty_huge

        raws = [m.raw for m in mods]
        rows = sum(r.shape[0] for r in raws)
        raw = empty_huge(rows * raws[0].shape[1]).view(rows, raws[0].shape[1])
        torch.cat(raws, 0, out=raw)
        return GGMLLinear(raw, mods[0].qtype, mods[0].in_features, bias, interleaved=mods[0].interleaved, owned=True)
    cat = {k: torch.cat([getattr(m, k) for m in mods], 0) for k in ("qweight", "scales", "zeros") if hasattr(mods[0], k)}
    if t is IntxLinear:  # packed rows concatenate as they are: no unpacking (no int32 transient)
        return IntxLinear.from_packed(cat["qweight"], cat["scales"], cat["zeros"], mods[0].bits,
                                      mods[0].group_size, mods[0].in_features, bias)
    return t(cat["qweight"], cat["scales"], bias)
