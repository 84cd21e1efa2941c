"""Compiler: load-time rewrites (passes), and later static memory plans, torch.compile and kernel autotuning.

Each pass lives in ``passes/`` (one per file), rewrites a loaded model in place, is switchable, and has an
equivalence test (before == after within a stated tolerance). ``run_passes`` applies them in order. These
passes are the start of O1; ``Engine.compile("O1")`` stays unavailable until O1's memory plan and static
buffers exist too.
"""

from __future__ import annotations

import importlib

# order matters: fusions run first, so folding scales the fused weights once
PASSES = ("fuse_qkv", "fuse_gate_up", "fold_rmsnorm")


def get_pass(name: str):
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; passes: {', '.join(PASSES)}")
    return importlib.import_module(f"{__name__}.passes.{name}").apply


def run_passes(model, names=PASSES) -> dict[str, int]:
    """Apply the named passes in the canonical order; returns how many sites each rewrote."""
    return {n: get_pass(n)(model) for n in PASSES if n in names}
