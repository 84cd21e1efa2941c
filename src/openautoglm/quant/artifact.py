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

from ..errors import InvalidModelError, InvalidParameterError
from .config import config_from_dict, config_to_dict
from .modules import MODULES

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
        sd = {}
        tied = hf_config.get("tie_word_embeddings") and isinstance(getattr(model, "lm_head", None), nn.Linear)
        for k, v in model.state_dict().items():
            if tied and k == "lm_head.weight":
                continue
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
    if qinfo.get("format_version") != FORMAT_VERSION:
        raise InvalidModelError(f"quantized artifact format {qinfo.get('format_version')} is not supported "
                                f"(this version reads {FORMAT_VERSION})")
    used = set()
    for name, cd in qinfo.get("plan", {}).items():
        cfg = config_from_dict(cd)
        lin = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        has_bias = lin.bias is not None
        t = {k: load(f"{name}.{k}") for k in (("qweight", "scales") + (("zeros",) if cfg.scheme == "int4" else ()))}
        bias = load(f"{name}.bias") if has_bias else None
        used |= {f"{name}.{k}" for k in t} | ({f"{name}.bias"} if has_bias else set())
        if cfg.scheme == "int8":
            mod = MODULES["int8"](t["qweight"].to(torch.int8), t["scales"], bias)
        else:
            from .primitives import unpack_bits

            codes = unpack_bits(t["qweight"].to(torch.uint8), 4, lin.in_features)
            mod = MODULES["int4"](codes, t["scales"], t["zeros"], cfg.group_size, bias)
        setattr(parent, child, mod)
    return used
