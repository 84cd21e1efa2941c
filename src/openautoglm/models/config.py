"""Typed model configuration, parsed and validated from an HF ``config.json``-style dict.

Accepts both transformers 4.x keys (``rope_theta``, ``rope_scaling``, top-level ``partial_rotary_factor``)
and 5.x keys (``rope_parameters``). Defaults per ``model_type`` follow the transformers config classes.
"""

from __future__ import annotations

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
        mt = d.get("model_type")
        if mt is None:
            raise InvalidModelError("config.json has no model_type")
        dflt = _DEFAULTS.get(mt, _DEFAULTS["llama"])
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rp = dict(d.get("rope_parameters") or {})
            scaling = d.get("rope_scaling") or None
            rope_type = rp.get("rope_type") or rp.get("type")
            if scaling is None and rope_type not in (None, "default"):
                scaling = rp
            if scaling is not None:
                scaling = dict(scaling)
                scaling.setdefault("rope_type", scaling.get("type", "default"))
                if scaling["rope_type"] == "default":
                    scaling = None
            theta = rp.get("rope_theta", d.get("rope_theta", dflt["rope_theta"]))
            prf = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", dflt["partial_rotary_factor"]))
            eos = d.get("eos_token_id")
            eos_t = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            cfg = cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(d.get("rms_norm_eps", dflt["rms_norm_eps"])),
                rope_theta=float(theta),
                rope_scaling=scaling,
                partial_rotary_factor=float(prf),
                attention_bias=bool(d.get("attention_bias", dflt["attention_bias"])),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                hidden_act=str(d.get("hidden_act", "silu")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos_t,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidModelError(f"config.json is missing or has a bad value for {e}") from None
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise InvalidModelError("num_attention_heads must be a multiple of num_key_value_heads")
        return cfg
