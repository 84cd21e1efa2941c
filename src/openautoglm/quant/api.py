"""``quantize_(model, plan_or_config)``: swap each ``nn.Linear`` for its quantized module, in place."""

from __future__ import annotations

from torch import nn

import dataclasses

from .config import QuantPlan
from .modules import MODULES


def fit_group(cfg, in_features: int):
    """The config with its group size halved until it divides ``in_features`` (SmolLM2's K=576 takes g64
    where g128 is asked), as llama.cpp falls back per tensor; recorded per layer in the plan."""
    g = getattr(cfg, "group_size", None)
    if g is None or in_features % g == 0:
        return cfg
    while g > 32 and in_features % g:
        g //= 2
    if in_features % g:
        raise ValueError(f"no int4 group size >= 32 divides {in_features}")
    return dataclasses.replace(cfg, group_size=g)


def quantize_(model: nn.Module, plan) -> dict[str, object]:
    """Quantize ``model`` in place. ``plan`` is a QuantPlan or one config for every linear but ``lm_head``.

    Returns ``{module name: config}`` of what was quantized (the record saved with an artifact).
    """
    if not isinstance(plan, QuantPlan):
        plan = QuantPlan.uniform(plan)
    done = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        cfg = plan.config_for(name)
        if cfg is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        cfg = fit_group(cfg, mod.in_features)
        # a tied lm_head gets its own quantized copy; the embedding table stays as it is
        setattr(parent, child, MODULES[cfg.scheme].from_linear(mod, cfg))
        done[name] = cfg
    return done
