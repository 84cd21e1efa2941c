"""Typed model configuration, parsed and validated from an HF ``config.json``-style dict.

Accepts both transformers 4.x keys (``rope_theta``, ``rope_scaling``, top-level ``partial_rotary_factor``)
and 5.x keys (``rope_parameters``). Defaults per ``model_type`` follow the transformers config classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import InvalidModelError

# Per-architecture defaults for keys a config.json may omit (transformers' config class defaults).
_DEFAULTS = {
    "llama": {"attention_bias": False, "partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2": {"attention_bias": True, "partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "glm4": {"attention_bias": True, "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1.5625e-07},
    "glm": {"attention_bias": True, "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1.5625e-07},
}


@dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters every model file reads. Field names follow HF ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    #: None, or a dict with ``rope_type`` in {"linear", "llama3", "freq_factors"} and that type's parameters
    #: (``freq_factors``: GGUF's ``rope_freqs`` divisors, one per frequency).
    rope_scaling: dict | None = None
    #: Fraction of ``head_dim`` that is rotated (GLM: 0.5).
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    #: One id or several; generation stops on any of them.
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Parse and validate: every field has its type and a plausible range (a corrupt or hostile config must
        not build a model of 10**308 layers or a 2**40-wide table), else one :class:`InvalidModelError`."""
        if not isinstance(d, dict):
            raise InvalidModelError(f"config.json must hold an object, not {type(d).__name__}")
        mt = d.get("model_type")
        if not isinstance(mt, str):
            raise InvalidModelError("config.json has no model_type (a string)")
        dflt = _DEFAULTS.get(mt, _DEFAULTS["llama"])
        rp = _opt_dict(d, "rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        rope_type = rp.get("rope_type") or rp.get("type")
        if scaling is None and rope_type not in (None, "default"):
            scaling = rp
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise InvalidModelError("config.json: rope_scaling must be an object")
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
            else:
                _check_rope_scaling(scaling)
        heads = _int(d, "num_attention_heads", 1, 1 << 12)
        hidden = _int(d, "hidden_size", 1, 1 << 17)
        eos = d.get("eos_token_id")
        eos_l = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        vocab = _int(d, "vocab_size", 1, 1 << 23)
        # (ids past the vocabulary are only never generated: transformers' GLM-4 defaults have such ids)
        if any(not _is_int(e) or not 0 <= e < 1 << 31 for e in eos_l):
            raise InvalidModelError("config.json: eos_token_id must be a token id or a list of them")
        bos = d.get("bos_token_id")
        if bos is not None and (not _is_int(bos) or not 0 <= bos < 1 << 31):
            raise InvalidModelError("config.json: bos_token_id must be a token id")
        act = d.get("hidden_act", "silu")
        if not isinstance(act, str):
            raise InvalidModelError("config.json: hidden_act must be a string")
        cfg = cls(
            model_type=mt,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(d, "intermediate_size", 1, 1 << 20),
            num_hidden_layers=_int(d, "num_hidden_layers", 1, 1 << 10),
            num_attention_heads=heads,
            num_key_value_heads=_int(d, "num_key_value_heads", 1, heads, default=heads),
            head_dim=_int(d, "head_dim", 1, 1 << 12, default=hidden // heads or None),
            max_position_embeddings=_int(d, "max_position_embeddings", 1, 1 << 20, default=2048),
            rms_norm_eps=_float(d, "rms_norm_eps", 0.0, 1.0, default=dflt["rms_norm_eps"]),
            rope_theta=_float(rp if "rope_theta" in rp else d, "rope_theta", 0.0, 1e12, default=dflt["rope_theta"]),
            rope_scaling=scaling,
            partial_rotary_factor=_float(rp if "partial_rotary_factor" in rp else d, "partial_rotary_factor", 0.0,
                                         1.0, default=dflt["partial_rotary_factor"], closed_hi=True),
            attention_bias=_bool(d, "attention_bias", dflt["attention_bias"]),
            tie_word_embeddings=_bool(d, "tie_word_embeddings", False),
            hidden_act=act,
            bos_token_id=bos,
            eos_token_id=tuple(eos_l),
        )
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise InvalidModelError("num_attention_heads must be a multiple of num_key_value_heads")
        if cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
            raise InvalidModelError(f"config.json: the rotary dimension (head_dim x partial_rotary_factor = "
                                    f"{cfg.rotary_dim}) must be even and at least 2")
        return cfg


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict, key: str, lo: int, hi: int, default=...) -> int:
    v = d.get(key, default)
    if v is None:  # an explicit null takes the default too
        v = default
    if v is ... or v is None:
        raise InvalidModelError(f"config.json is missing {key}")
    if isinstance(v, float) and v.is_integer():  # some writers store 2048.0
        v = int(v)
    if not _is_int(v) or not lo <= v <= hi:
        raise InvalidModelError(f"config.json: {key} must be an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _float(d: dict, key: str, lo: float, hi: float, default, closed_hi: bool = False) -> float:
    v = d.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo < v and (
        v <= hi if closed_hi else v < hi)
    if not ok:
        raise InvalidModelError(f"config.json: {key} must be a number in ({lo}, {hi}{']' if closed_hi else ')'}, "
                                f"got {_show(v)}")
    return float(v)


def _bool(d: dict, key: str, default: bool) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidModelError(f"config.json: {key} must be true or false, got {_show(v)}")
    return v


def _opt_dict(d: dict, key: str) -> dict | None:
    v = d.get(key)
    if v is not None and not isinstance(v, dict):
        raise InvalidModelError(f"config.json: {key} must be an object")
    return v


def _check_rope_scaling(sc: dict) -> None:
    kind = sc.get("rope_type")
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings"), "freq_factors": ()}
    if kind not in need:
        raise InvalidModelError(f"unsupported rope scaling type {_show(kind)} (supported: linear, llama3, freq_factors)")
    for k in need[kind]:
        _float(sc, k, 0.0, 1e12, default=None)
    if kind == "llama3" and sc["low_freq_factor"] == sc["high_freq_factor"]:
        raise InvalidModelError("rope scaling llama3: low_freq_factor and high_freq_factor must differ")
    if kind == "freq_factors":
        f = sc.get("factors")
        if not isinstance(f, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                              and math.isfinite(x) and x > 0 for x in f):
            raise InvalidModelError("rope freq factors must be a list of positive numbers")


def _show(v) -> str:
    t = repr(v)
    return t if len(t) <= 40 else t[:40] + "..."
