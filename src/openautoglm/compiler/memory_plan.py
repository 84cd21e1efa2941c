"""The static memory plan of a compiled model: every byte the runtime holds, decided before the first request.

- weights: the tensors as held (quantized codes and qparams, float layers), tied tensors once;
- KV cache: ``layers x 2 x batch x kv_heads x max_len x head_dim`` in the cache dtype, allocated once at compile
  time and reused by every generation that fits (``KVCache`` rows are selected, not reallocated);
- kernel packs: the CPU-specific int4 layouts (``_convert_weight_to_int4pack_for_cpu``) built at load beside the
  portable codes, one byte per two weights plus bf16 scales and zeros, for the layers that run torch's int4
  kernel (at O3 a layer whose decode and prefill choices both read the portable codes builds none);
- activations: the peak live set of one forward step at the planned shapes (the largest prefill chunk, or a
  decode step of the whole batch), from the layer shapes: the residual stream, the fused q/k/v, attention
  output, the fused gate/up and its product, and the logits rows. At O2 inductor lays these buffers out
  statically inside the compiled graphs; at O1 the plan bounds what the eager allocator reuses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class MemoryPlan:
    max_batch: int
    max_len: int
    prefill_tokens: int
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    pack_bytes: int = 0
    kv_dtype: str = "float32"

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.pack_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def weight_bytes_by_dtype(model) -> dict[str, int]:
    """Bytes of the weights as held in memory, by dtype: parameters and persistent buffers (quantized codes,
    scales), tied tensors counted once; recomputed tables (RoPE) are not weights."""
    out: dict[str, int] = {}
    seen = set()
    for m in model.modules():  # GGML blocks (GGUF quantized tensors as stored): by their type
        if hasattr(m, "raw") and hasattr(m, "qtype") and m.raw.data_ptr() not in seen:
            seen.add(m.raw.data_ptr())
            out[m.qtype] = out.get(m.qtype, 0) + m.raw.numel()
    for t in model.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        k = str(t.dtype).replace("torch.", "")
        out[k] = out.get(k, 0) + t.numel() * t.element_size()
    return out


def weight_bytes(model) -> int:
    return sum(weight_bytes_by_dtype(model).values())


def packing_layers(model):
    """The int4 layers that build a CPU pack: those that may run their native kernel (not those an O3 choice
    replaced in both buckets)."""
    from .impls import TunedLinear

    skip = {id(t.impls["native"]) for t in model.modules() if isinstance(t, TunedLinear) and "native" not in t.names}
    return [m for m in model.modules() if hasattr(m, "_pack") and id(m) not in skip]


def pack_bytes(model) -> int:
    """Bytes of the int4 CPU packs the quantized layers build: (N, K/2) codes and (K/g, N, 2) bf16 qparams."""
    total = 0
    for m in packing_layers(model):
        if hasattr(m, "group_size"):
            n, k = m.out_features, m.in_features
            total += n * k // 2 + (k // m.group_size) * n * 2 * 2
    return total


def activation_bytes(cfg, tokens: int, rows_with_logits: int, dtype_bytes: int) -> int:
    """Peak live activations of one step over ``tokens`` tokens (two residual copies, the widest projection,
    the attention output) plus the float32 logits of ``rows_with_logits`` rows."""
    D, I = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    widest = max(qkv + cfg.num_attention_heads * cfg.head_dim, 3 * I)  # q/k/v + attn out, or gate/up + product
    return tokens * (2 * D + widest) * dtype_bytes + rows_with_logits * cfg.vocab_size * 4


def plan(model, max_batch: int, max_len: int, prefill_tokens: int, dtype=torch.float32, kv_dtype=None) -> MemoryPlan:
    """``dtype``: the activations'; ``kv_dtype``: the cache's (default: the activations')."""
    cfg = model.config
    kv_dtype = kv_dtype or dtype
    dt, kdt = torch.empty(0, dtype=dtype).element_size(), torch.empty(0, dtype=kv_dtype).element_size()
    # (int8: each (token, kv head) vector also has an fp16 scale)
    per_vec = cfg.head_dim * kdt + (2 if kv_dtype == torch.int8 else 0)
    kv = cfg.num_hidden_layers * 2 * max_batch * cfg.num_key_value_heads * max_len * per_vec
    act = max(activation_bytes(cfg, prefill_tokens, max_batch, dt), activation_bytes(cfg, max_batch, max_batch, dt))
    return MemoryPlan(max_batch, max_len, prefill_tokens, weight_bytes(model), kv, act, pack_bytes(model),
                      str(kv_dtype).replace("torch.", ""))
