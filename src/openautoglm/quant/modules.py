"""Quantized linear layers on torch's CPU weight-only kernels, each with a dequantize-then-matmul reference.

Scales and zeros are stored in bf16, the precision the kernels consume, so the reference path dequantizes
exactly the weights the kernel uses. The kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
are vectorized for bf16 activations only, so inputs are cast to bf16 for the matmul and the output back to the caller's dtype. The int4 packed
layout depends on the CPU, so it is built here at load time from portable unpacked codes.
"""

from __future__ import annotations

import torch
from torch import nn

from . import primitives as P


class Int8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())  # int8 (N, K)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (N,), as the kernel takes them
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg) -> "Int8Linear":
        q, s = P.int8_per_channel(lin.weight.detach())
        return cls(q, s, lin.bias)

    def dequantized(self) -> torch.Tensor:
        return P.dequant_int8(self.qweight, self.scales)

    def forward(self, x):
        shape = x.shape
        # the kernel needs a fresh contiguous bf16 input (it crashes on strided or misaligned ones)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous().clone()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def forward_reference(self, x):
        return nn.functional.linear(x.float(), self.dequantized(), None if self.bias is None else self.bias.float())


class Int4Linear(nn.Module):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("qweight", P.pack_bits(codes, 4))  # portable: two codes per byte (N, K/2)
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (N, K/g), as the kernel takes them
        self.register_buffer("zeros", zeros.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._packed = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, cfg) -> "Int4Linear":
        q, s, z = P.asym_per_group(lin.weight.detach(), 4, cfg.group_size)
        return cls(q, s, z, cfg.group_size, lin.bias)

    def codes(self) -> torch.Tensor:
        return P.unpack_bits(self.qweight, 4, self.in_features)

    def dequantized(self) -> torch.Tensor:
        return P.dequant_asym(self.codes(), self.scales, self.zeros, 4)

    def _pack(self):
        codes = self.codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()  # (K/g, N, 2) bf16
        self._packed = (packed, sz)

    def forward(self, x):
        if self._packed is None:
            self._pack()
        packed, sz = self._packed
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def forward_reference(self, x):
        return nn.functional.linear(x.float(), self.dequantized(), None if self.bias is None else self.bias.float())


MODULES = {"int8": Int8Linear, "int4": Int4Linear}
