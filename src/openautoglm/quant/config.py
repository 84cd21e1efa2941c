"""Frozen, versioned quantization configs, and per-layer plans (mixed precision) matched by name pattern."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """int8 weights, symmetric per output channel; activations stay in floating point (bf16 in the kernel)."""

    version: int = 1
    scheme: str = "int8"


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """int4 weights, asymmetric per group of ``group_size`` input columns (32, 64, 128 or 256)."""

    group_size: int = 32
    version: int = 1
    scheme: str = "int4"

    def __post_init__(self):
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size}")


CONFIGS = {"int8": Int8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}


def config_to_dict(c) -> dict:
    return asdict(c)


def config_from_dict(d: dict):
    d = dict(d)
    cls = CONFIGS[d.get("scheme")]
    return cls(**d)


@dataclass(frozen=True)
class QuantPlan:
    """Which config each linear layer gets: the first matching ``(pattern, config)`` wins; ``None`` keeps the
    layer in floating point. Patterns are fnmatch globs over module names (``model.layers.*.mlp.*``)."""

    rules: tuple = field(default_factory=tuple)
    version: int = 1

    def config_for(self, name: str):
        for pat, cfg in self.rules:
            if fnmatch.fnmatchcase(name, pat):
                return cfg
        return None

    @classmethod
    def uniform(cls, cfg, include_lm_head: bool = False) -> "QuantPlan":
        rules = [] if include_lm_head else [("lm_head", None)]
        return cls(tuple(rules + [("*", cfg)]))
