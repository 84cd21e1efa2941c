"""``quantize_(model, plan_or_config)``: swap each planned layer for its quantized module, in place."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import QuantPlan
from .modules import QuantEmbedding, quantized_linear


def fit_group(cfg, in_features: int):
    """The config with its group size halved until it divides ``in_features`` (SmolLM2's K=576 takes g64
    where g128 is asked), as llama.cpp falls back per tensor; recorded per layer in the plan."""
    g = getattr(cfg, "group_size", None)
    if g is None or in_features % g == 0:
        return cfg
    while g > 32 and in_features % g:
        g //= 2
    if in_features % g:
        raise ValueError(f"no group size >= 32 divides {in_features}")
    return dataclasses.replace(cfg, group_size=g)


def is_tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def planned_layers(model: nn.Module, plan: QuantPlan) -> dict[str, object]:
    """``{name: config}`` for every layer ``plan`` quantizes: linears (``lm_head`` included) and, for untied
    models, ``model.embed_tokens``; group sizes fitted to each layer's input width."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (cfg := plan.config_for(name)) is not None:
            out[name] = fit_group(cfg, mod.in_features)
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(emb, nn.Embedding) and not is_tied(model):
        if (cfg := plan.config_for("model.embed_tokens")) is not None:
            out["model.embed_tokens"] = fit_group(cfg, emb.embedding_dim)
    return out


def set_module(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, mod)


def install(model: nn.Module, name: str, qmod) -> None:
    """Put a quantized table in place of layer ``name``; embeddings read rows from it (with tied embeddings
    the quantized ``lm_head`` also serves ``model.embed_tokens``)."""
    if name == "model.embed_tokens":
        set_module(model, name, QuantEmbedding(qmod, tied=False))
        return
    set_module(model, name, qmod)
    if name == "lm_head" and is_tied(model):
        model.model.embed_tokens = QuantEmbedding(qmod, tied=True)


def layer_weight(model: nn.Module, name: str):
    mod = model.get_submodule(name)
    return (mod.weight, None) if isinstance(mod, nn.Embedding) else (mod.weight, mod.bias)


def quantize_(model: nn.Module, plan) -> dict[str, object]:
    """Quantize ``model`` in place. ``plan`` is a QuantPlan, or one config for every layer (the embeddings and
    ``lm_head`` included). Returns ``{layer name: config}``, the record saved with an artifact."""
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.uniform(plan)
    done = planned_layers(model, plan)
    for name, cfg in done.items():
        w, b = layer_weight(model, name)
        install(model, name, quantized_linear(w, b, cfg))
    return done
