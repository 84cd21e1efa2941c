"""Frozen, versioned quantization configs, and per-layer plans (mixed precision) matched by name pattern."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

SCALE_BITS = 16  # scales and zeros are stored in bf16, the precision the kernels take


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights, symmetric per output channel; activations stay in floating point (bf16 in the kernel)."""

    version: int = 1
    scheme: str = "int8"

    def bits_per_weight(self, in_features: int) -> float:
        return 8 + SCALE_BITS / in_features

    @property
    def name(self) -> str:
        return "int8"


@dataclass(frozen=True)
class IntxWeightOnlyConfig:
    """int2/int3/int4 weights, asymmetric per group of ``group_size`` input columns (32, 64, 128 or 256),
    stored bit-packed; all run on the int4 CPU kernel (a b-bit code, centred, is a 4-bit code)."""

    bits: int = 4
    group_size: int = 32
    version: int = 1
    scheme: str = ""

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ValueError(f"weight-only bits must be 2, 3 or 4, got {self.bits}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {self.group_size}")
        if self.scheme not in ("", f"int{self.bits}"):
            raise ValueError(f"scheme {self.scheme!r} does not match bits={self.bits}")
        object.__setattr__(self, "scheme", f"int{self.bits}")

    def bits_per_weight(self, in_features: int) -> float:
        return self.bits + 2 * SCALE_BITS / self.group_size

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}"


def Int4WeightOnlyConfig(group_size: int = 32) -> IntxWeightOnlyConfig:  # noqa: N802 (torchao's name)
    return IntxWeightOnlyConfig(4, group_size)


@dataclass(frozen=True)
class GGMLConfig:
    """A GGML block format (``Q4_K``, ``Q5_0``, ``Q8_0``...) kept as the GGUF file stores it: what a GGUF
    checkpoint's quantized tensors load as. Not a quantization scheme of ours: nothing quantizes to it."""

    qtype: str
    version: int = 1
    scheme: str = "gguf"

    def bits_per_weight(self, in_features: int) -> float:
        from ..formats.gguf_quants import BLOCK_SIZES

        block, nbytes = BLOCK_SIZES[self.qtype]
        return 8 * nbytes / block

    @property
    def name(self) -> str:
        return self.qtype.lower()


@dataclass(frozen=True)
class Int8DynActInt8WeightConfig:
    """W8A8 dynamic: int8 weights per output channel, activations quantized to int8 per token at run time,
    int8 x int8 -> int32 matmul (``torch._int_mm``)."""

    version: int = 1
    scheme: str = "w8a8"

    def bits_per_weight(self, in_features: int) -> float:
        return 8 + SCALE_BITS / in_features

    @property
    def name(self) -> str:
        return "w8a8"


def config_to_dict(c) -> dict:
    return asdict(c)


def config_from_dict(d: dict):
    d = dict(d)
    scheme = d.get("scheme")
    if scheme == "int8":
        return Int8WeightOnlyConfig(**d)
    if scheme == "w8a8":
        return Int8DynActInt8WeightConfig(**d)
    if scheme in ("int2", "int3", "int4"):
        d.setdefault("bits", int(scheme[3:]))
        return IntxWeightOnlyConfig(**d)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def parse_scheme(scheme: str, group_size: int = 32):
    """``int8`` | ``w8a8`` | ``int4`` / ``int3`` / ``int2`` (with ``group_size``) | ``int4-g64`` -> a config."""
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    if scheme == "w8a8":
        return Int8DynActInt8WeightConfig()
    base, _, g = scheme.partition("-g")
    if base in ("int2", "int3", "int4"):
        return IntxWeightOnlyConfig(int(base[3:]), int(g) if g else group_size)
    raise ValueError(f"unknown scheme {scheme!r}: expected int8, int4, int3, int2 or w8a8")


@dataclass(frozen=True)
class QuantPlan:
    """Which config each layer gets: the first matching ``(pattern, config)`` wins; ``None`` keeps the layer in
    floating point. Patterns are fnmatch globs over module names (``model.layers.*.mlp.*``). The names cover
    every ``nn.Linear``, ``lm_head`` and ``model.embed_tokens``; with tied embeddings one tensor serves both,
    so ``lm_head``'s config decides it and the embedding rows are read from the quantized head."""

    rules: tuple = field(default_factory=tuple)
    version: int = 1

    def config_for(self, name: str):
        for pat, cfg in self.rules:
            if fnmatch.fnmatchcase(name, pat):
                return cfg
        return None

    @classmethod
    def uniform(cls, cfg, embeddings="same") -> "QuantPlan":
        """``cfg`` for every linear. The embedding table and ``lm_head``: ``"same"`` (``cfg``), ``"int8"``
        (kept at 8 bits, as llama.cpp keeps its output and embedding tensors at a higher precision), a config,
        or ``"float"`` / ``None`` (left as they are)."""
        if embeddings == "same":
            table = cfg
        elif embeddings == "int8":
            table = Int8WeightOnlyConfig()
        elif embeddings in ("float", None):
            table = None
        else:
            table = embeddings
        return cls((("lm_head", table), ("model.embed_tokens", table), ("*", cfg)))
