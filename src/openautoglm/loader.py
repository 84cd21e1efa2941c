"""Checkpoint -> ready ``nn.Module``: the glue between ``formats/`` and ``models/``.

The model is built on the meta device, each tensor is read (dequantized) once and assigned in place, so peak
memory is about one copy of the float32 weights. Loading shows progress on stderr.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import InvalidModelError
from .formats import Checkpoint, open_checkpoint
from .models import ModelConfig, build_model, materialize
from .progress import Progress


def load_model(source: str | Path | Checkpoint, progress: bool = True) -> tuple[nn.Module, Checkpoint]:
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    cfg = ModelConfig.from_hf(ckpt.config)
    model = build_model(cfg)
    qinfo = ckpt.config.get("quantization")
    if qinfo:  # a quantized artifact: its planned linears become quantized modules, read as stored
        from .quant.artifact import apply_quantized_structure

        apply_quantized_structure(model, qinfo, ckpt.load_raw)
    params = dict(model.named_parameters())
    expected = set(params)
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(ckpt.tensors))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InvalidModelError(f"{ckpt.path} lacks tensors the {cfg.model_type} model needs: {', '.join(missing[:3])}{more}")

    state = {}
    with Progress(f"loading {Path(ckpt.path).name}", total=len(expected), unit=" tensors", enabled=progress) as pb:
        for name in sorted(expected):
            t = ckpt.load(name)
            if tuple(t.shape) != tuple(params[name].shape):
                raise InvalidModelError(
                    f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(params[name].shape)}"
                )
            state[name] = t
            pb.update()
    model.load_state_dict(state, strict=False, assign=True)
    materialize(model)
    model.eval().requires_grad_(False)
    return model, ckpt
