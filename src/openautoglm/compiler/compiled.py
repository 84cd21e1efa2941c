"""O2: the decode step compiled ahead of time (AOTInductor, inductor's C++ backend; see ``aot.py``).

``CompiledLM`` has the model's call signature and is what the engine's ``runtime.runner.ModelRunner`` calls. A
decode step (one token per row) over the planned cache, with a static attended length (``KVCache.static_len``,
which the runner sets from its length bucket), runs the compiled package for that length; anything else (prefill,
whose GEMMs are already large and whose prompt lengths vary; another cache; rows other than the first B) runs the
eager model. Packages
are built at warm-up, or loaded from the on-disk cache when this machine built them before; a length first seen
later is compiled once, on first use. Nothing is traced or compiled while a generation runs.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..progress import Progress
from . import aot


def prepare_kernels(model: nn.Module) -> None:
    """Build the CPU-specific weight packs now (not lazily inside the compiled region), for the layers that run
    torch's int4 kernel; drop those that autotuning built for layers that never will. Freed temporaries are
    handed back after each layer: glibc otherwise keeps them, ~150 MB at peak for SmolLM2."""
    from ..sysmem import return_freed_memory
    from .memory_plan import packing_layers

    users = {id(m) for m in packing_layers(model)}
    for m in model.modules():
        if not hasattr(m, "_pack"):
            continue
        if id(m) not in users:
            if m.packed is not None:
                m.packed = m.packed_sz = None
                return_freed_memory()
        elif m.packed is None:
            m._pack()
            return_freed_memory()


class CompiledLM(nn.Module):
    def __init__(self, model: nn.Module, cache, cache_dir: Path):
        super().__init__()
        self.model = model
        self.config = model.config
        self.cache_dir = cache_dir
        self._cache = cache  # the planned cache: the packages are specialized to its tensors' shapes
        self._shape = tuple(cache.k[0].shape)
        self._steps: dict[int, aot.CompiledStep] = {}
        self._paths: dict[int, Path] = {}
        self.packages_built = 0  # compiled in this process (not loaded from disk)
        self.compiled_calls = 0
        prepare_kernels(model)

    def _fits(self, input_ids, cache, logits_at) -> bool:
        return (input_ids.shape[1] == 1 and logits_at is None and cache is not None and bool(cache.static_len)
                and tuple(cache.k[0].shape) == self._shape and cache.k[0].dtype == self._cache.k[0].dtype
                and (cache._slots is None or cache._run == (0, input_ids.shape[0])))

    def forward(self, input_ids, positions=None, cache=None, logits_at=None):
        if positions is not None and self._fits(input_ids, cache, logits_at):
            step = self._steps.get(cache.static_len) or self._load(cache.static_len)
            self.__dict__["compiled_calls"] += 1  # a plain attribute: past nn.Module's __setattr__
            return step(input_ids.contiguous(), positions.contiguous(), cache)
        return self.model(input_ids, positions, cache, logits_at)

    def _path(self, static_len: int) -> Path:
        # the key hashes the module tree and our sources: once a length, not on every step that asks has_step
        p = self._paths.get(static_len)
        if p is None:
            key = aot.package_key(self.model, self._shape, static_len, self._cache.dtype)
            p = self._paths[static_len] = self.cache_dir / f"decode-{key}.pt2"
        return p

    def has_step(self, static_len: int) -> bool:
        """Whether the step for ``static_len`` runs without compiling first (loaded, or built on this machine)."""
        if static_len in self._steps:
            return True
        path = self._path(static_len)
        return path.is_file() and aot.constants_file(path).is_file()

    @property
    def cache(self):
        """The planned cache the packages are specialized to."""
        return self._cache

    def _load(self, static_len: int) -> aot.CompiledStep:
        path = self._path(static_len)
        if not path.is_file() or not aot.constants_file(path).is_file():
            aot.compile_package(self.model, self._cache, static_len, path)
            self.packages_built += 1
        self._steps[static_len] = step = aot.CompiledStep(path, self.model, static_len)
        return step

    def warm_up(self, lens: list[int], progress: bool = True) -> None:
        """Build (or load from the disk cache) the decode packages for each attended length in ``lens`` now, so
        requests do not pay for it."""
        with Progress("compiling decode step", total=len(lens), unit=" shapes", enabled=progress) as pb:
            for n in lens:
                if n not in self._steps:
                    self._load(n)
                pb.update()
