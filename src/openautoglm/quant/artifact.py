"""Quantized artifacts: a HF-style directory that loads with ``Engine(model=DIR)`` and needs no recalibration.

Layout: ``model.safetensors`` (portable tensors: int8 codes, int4 codes two per byte, float scales/zeros, the
float layers as they were), ``config.json`` with a ``quantization`` block (format version, scheme, method and
the per-layer plan), and the tokenizer files. Never a CPU-specific packed layout: int4 is packed for the
kernel at load time. The directory is written next to its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CorruptModelError, InvalidModelError, InvalidParameterError, corrupt_on_error
from .config import config_from_dict, config_to_dict

FORMAT_VERSION = 1


def save_artifact(model: nn.Module, hf_config: dict, tokenizer, plan_record: dict, out: str | Path,
                  scheme: str, method: str = "rtn", extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise InvalidParameterError(f"{out} already exists; choose a new --output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sd, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.data_ptr() in seen or k.endswith("._dtype"):
                continue  # tied tensors are stored once
            seen.add(v.data_ptr())
            sd[k] = v.detach().contiguous().clone()
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(hf_config)
        cfg["quantization"] = {
            "format_version": FORMAT_VERSION, "scheme": scheme, "method": method,
            "plan": {name: config_to_dict(c) for name, c in plan_record.items()}, **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template}))
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tokenizer.eog_ids)}))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def apply_quantized_structure(model: nn.Module, qinfo: dict, load) -> set[str]:
    """Replace the planned linears of a meta-device model by quantized modules read with ``load(name)``.

    Returns the tensor names consumed.
    """
    if not isinstance(qinfo, dict):
        raise CorruptModelError("the artifact's quantization record (config.json) must be an object")
    if qinfo.get("format_version") != FORMAT_VERSION:
        raise InvalidModelError(f"quantized artifact format {qinfo.get('format_version')} is not supported "
                                f"(this version reads {FORMAT_VERSION})")
    from .api import install
    from .modules import IntxLinear, from_qparams

    plan = qinfo.get("plan", {})
    if not isinstance(plan, dict):
        raise CorruptModelError("the artifact's quantization plan (config.json) must be an object")
    with corrupt_on_error("the artifact's quantization record (config.json)"):
        return _apply_plan(model, plan, load, install, IntxLinear, from_qparams)


def _apply_plan(model, plan: dict, load, install, IntxLinear, from_qparams) -> set[str]:
    used = set()
    for name, cd in plan.items():
        cfg = config_from_dict(cd)
        layer = model.get_submodule(name)
        prefix = f"{name}.table" if name == "model.embed_tokens" else name
        has_bias = getattr(layer, "bias", None) is not None
        keys = ("qweight", "scales") + (("zeros",) if hasattr(cfg, "bits") else ())
        t = {k: load(f"{prefix}.{k}") for k in keys}
        bias = load(f"{prefix}.bias") if has_bias else None
        used |= {f"{prefix}.{k}" for k in t} | ({f"{prefix}.bias"} if has_bias else set())
        if hasattr(cfg, "bits"):
            K = layer.embedding_dim if isinstance(layer, nn.Embedding) else layer.in_features
            q = t["qweight"].to(torch.uint8)
            if q.shape[1] * 8 != K * cfg.bits:
                raise InvalidModelError(f"{prefix}.qweight has {q.shape[1]} bytes a row; {cfg.name} at K={K} "
                                        f"needs {K * cfg.bits // 8}")
            mod = IntxLinear.from_packed(q, t["scales"], t["zeros"], cfg.bits, cfg.group_size, K, bias)
        else:
            mod = from_qparams(cfg, t["qweight"].to(torch.int8), t["scales"], None, bias)
        install(model, name, mod)
    return used
