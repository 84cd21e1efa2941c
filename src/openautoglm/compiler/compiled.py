"""O2: the decode step compiled by ``torch.compile`` (inductor, C++ backend) at static shapes.

``CompiledLM`` has the model's call signature and is what generation calls. A decode step (one token per row)
with a static-length cache (``KVCache.static_len``, set by generation from the compiled engine's bucket) runs
the compiled graph, specialized to (batch, attended length): a generation keeps one shape from its first
decode step to its last, so nothing recompiles during it. Prefill keeps the eager path, whose GEMMs are
already large (and whose prompt lengths vary). Inductor's FX graph and AOT autograd caches are on disk, so a
second process compiling the same graphs loads them instead of generating code again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..progress import Progress


def _configure(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    import torch._inductor.config as ic

    ic.fx_graph_cache = True
    ic.freezing = False  # weights stay module state (quantized packs are built at load); see BENCHMARKS.md
    ic.cpp_wrapper = os.environ.get("OPENAUTOGLM_CPP_WRAPPER", "1") == "1"


def prepare_kernels(model: nn.Module) -> None:
    """Build the CPU-specific weight packs now (not lazily inside the compiled region)."""
    for m in model.modules():
        if hasattr(m, "_pack") and getattr(m, "_packed", 1) is None:
            m._pack()


class CompiledLM(nn.Module):
    def __init__(self, model: nn.Module, cache_dir: Path):
        super().__init__()
        _configure(cache_dir)
        self.model = model
        self.config = model.config
        prepare_kernels(model)
        self._decode = torch.compile(model, dynamic=False, fullgraph=False)

    def forward(self, input_ids, positions=None, cache=None, logits_at=None):
        if cache is not None and input_ids.shape[1] == 1 and cache.static_len and logits_at is None:
            return self._decode(input_ids, positions, cache)
        return self.model(input_ids, positions, cache, logits_at)

    @torch.inference_mode()
    def warm_up(self, cache, lens: list[int], progress: bool = True) -> None:
        """Compile the decode graphs for the planned cache at each attended length in ``lens`` now (or load them
        from the disk cache), so requests do not pay for it."""
        B = cache.batch
        ids = torch.zeros(B, 1, dtype=torch.long)
        saved = cache.static_len
        with Progress("compiling decode step", total=len(lens), unit=" shapes", enabled=progress) as pb:
            for n in lens:
                cache.static_len = n
                cache.select(None)
                for step in range(2):  # the second call checks the guards hold (no recompile)
                    self.forward(ids, torch.full((B, 1), step), cache)
                pb.update()
        cache.static_len = saved
