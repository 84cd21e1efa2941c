"""Architectures, one module per HF ``model_type``, found by name (a plugin registry).

``build_model(config)`` creates the module on the meta device (no memory, no random init); the loader then
assigns real tensors and calls :func:`materialize` to tie weights and compute constant buffers.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .config import ModelConfig

# model_type -> (module, class)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "glm4": ("glm4", "Glm4ForCausalLM"),
    "glm": ("glm", "GlmForCausalLM"),
}

__all__ = ["ARCHITECTURES", "ModelConfig", "build_model", "materialize", "model_class"]


def model_class(model_type: str):
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    mod, cls = ARCHITECTURES[model_type]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    with torch.device(device):
        return model_class(cfg.model_type)(cfg)


def materialize(model: nn.Module, device=None) -> nn.Module:
    """Tie embeddings and compute non-persistent buffers (RoPE tables) once weights are in place."""
    model.tie_weights()
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers(device)
    return model
