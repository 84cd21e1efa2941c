"""Quantization: pure primitives -> frozen configs -> quantized modules -> one verb, ``quantize_``.

Layered as torchao does: ``primitives`` (choose qparams, quantize, dequantize, pack; pure functions),
``config`` (frozen, versioned dataclasses, and per-layer plans matched by module-name pattern), ``modules``
(quantized linear layers on torch's fast CPU kernels, each with a dequantize-then-matmul reference), and
``api.quantize_``.
"""

from .api import quantize_
from .config import Int4WeightOnlyConfig, Int8WeightOnlyConfig, QuantPlan

__all__ = ["Int4WeightOnlyConfig", "Int8WeightOnlyConfig", "QuantPlan", "quantize_"]
