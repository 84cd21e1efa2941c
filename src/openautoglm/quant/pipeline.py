"""The whole quantization job behind ``Engine.quantize`` and ``openautoglm quantize``: pick the plan (one scheme
for every layer, or the automatic mixed-precision plan), quantize with RTN, GPTQ or AWQ on calibration text,
and measure the result's KLD from the float model on calibration text (the number the plan predicts)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InvalidParameterError
from .api import quantize_
from .config import QuantPlan, parse_scheme

SCHEMES = ("int8", "int4", "int3", "int2", "w8a8", "auto")
METHODS = ("rtn", "gptq", "awq")


@dataclass
class QuantResult:
    plan: dict  # layer -> config
    scheme: str  # "int4-g32", "w8a8", "auto-3.5", ...
    method: str
    bits_per_weight: float
    calibration_kld: float
    report: dict = field(default_factory=dict)  # auto: target, predicted and measured loss, per-layer rows


def _bits(model_before: dict[str, tuple[int, int]], plan: dict) -> float:
    n = sum(model_before[k][0] for k in plan)
    return sum(model_before[k][0] * c.bits_per_weight(model_before[k][1]) for k, c in plan.items()) / max(n, 1)


EMBEDDINGS = ("int8", "same", "float")


def check_options(scheme: str, group_size: int = 32, method: str = "rtn", target_bits: float | None = None,
                  calib_tokens: int = 8192, embeddings: str = "int8"):
    """Validate a quantization request before any slow work; returns the config (None for auto)."""
    if embeddings not in EMBEDDINGS:
        raise InvalidParameterError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got {embeddings!r}")
    if scheme not in SCHEMES:
        raise InvalidParameterError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise InvalidParameterError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if scheme == "auto":
        if target_bits is None:
            raise InvalidParameterError("--scheme auto needs --target-bits (average bits per weight, scales included)")
        if not 2.0 <= target_bits <= 16.0:
            raise InvalidParameterError(f"--target-bits must be between 2 and 16, got {target_bits}")
    elif target_bits is not None:
        raise InvalidParameterError("--target-bits applies to --scheme auto only")
    if calib_tokens < 16:
        raise InvalidParameterError("--calib-tokens must be at least 16")
    if scheme == "w8a8" and method == "awq":
        raise InvalidParameterError("AWQ scaling targets weight-only formats; use rtn or gptq with w8a8")
    try:
        return None if scheme == "auto" else parse_scheme(scheme, group_size)
    except ValueError as e:
        raise InvalidParameterError(str(e)) from None



def quantize_model(model: nn.Module, tokenizer, model_path, scheme: str, group_size: int = 32,
                   method: str = "rtn", target_bits: float | None = None, embeddings: str = "int8",
                   calib_text: str | None = None, calib_tokens: int = 8192, calib_ctx: int = 512,
                   act_order: bool = True, progress: bool = True) -> QuantResult:
    from .auto import _Reference, _units, cache_dir, cache_key, measure_sensitivity, plan_table, solve
    from .calibrate import calibrated_quantize_, calibration_windows

    cfg = check_options(scheme, group_size, method, target_bits, calib_tokens, embeddings)
    windows = calibration_windows(tokenizer, calib_text, calib_tokens, calib_ctx)
    # the sensitivity probe text: 256 calibration tokens (every probe runs the model's tail on it, ~1000 probes)
    probe = calibration_windows(tokenizer, calib_text, 256, min(128, calib_ctx))[:2]
    with torch.no_grad():
        ref = _Reference(model(probe))
    sizes = _units(model)
    report = {}
    if scheme == "auto":
        path = cache_dir() / f"{cache_key(model_path, 'gptq' if method == 'gptq' else 'rtn', probe, windows if method == 'gptq' else None)}.json"
        units = measure_sensitivity(model, probe, "gptq" if method == "gptq" else "rtn", windows, progress, path)
        if embeddings == "float":
            units = {k: v for k, v in units.items() if k not in ("lm_head", "model.embed_tokens")}
        chosen, predicted, bits = solve(units, target_bits)
        plan = QuantPlan(tuple(chosen.items()))
        report = {"target_bits": target_bits, "predicted_kld": predicted,
                  "layers": {n: {"format": c.name, "predicted_dkld": units[n].dkld[c.name]} for n, c in chosen.items()}}
        if progress:
            sys.stderr.write(plan_table(chosen, units) + "\n")
        label = f"auto-{target_bits:g}"
    else:
        plan = QuantPlan.uniform(cfg, embeddings=embeddings)
        label = cfg.name
    if method == "rtn":
        done = quantize_(model, plan)
    else:
        done = calibrated_quantize_(model, plan, method, windows, act_order=act_order, progress=progress, stats=report)
    with torch.no_grad():
        kld = ref.kld(model(probe))
    if scheme == "auto":
        report["measured_kld"] = kld
        if progress:
            sys.stderr.write(f"[openautoglm] auto plan: {_bits(sizes, done):.3f} bits/weight (target {target_bits}); "
                             f"KLD on calibration text predicted {report['predicted_kld']:.4f}, measured {kld:.4f}\n")
    return QuantResult(done, label, method, _bits(sizes, done), kld, report)
