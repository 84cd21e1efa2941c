"""O2's compiled decode step: exported with ``torch.export`` and compiled ahead of time by AOTInductor (inductor's
C++ backend, cpp wrapper) into a package on disk, one per attended-length bucket.

The step is ``(ids (B, 1), positions (B, 1), kv, weights) -> logits``: the KV cache tensors are inputs, written in
place by the compiled code, so prefill (eager) and decode (compiled) share one cache; the model's tensors are
inputs too (``torch.func.functional_call``), so the package holds code only and the weights are in memory once. The batch is a dynamic dimension
(1..planned batch), the attended length is static (the bucket), so a generation keeps one package from its first
decode step to its last and nothing is traced or compiled while it runs; there are no Dynamo guards per step.

Packages are keyed by what determines the code: the
module tree (types, shapes, formats, kernel choices), the config, the batch and length, the activation dtype, the
sources of the modules that define the step, the CPU flags and the torch version. A second start loads them in
well under a second each instead of tracing and compiling.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..runtime.kv_cache import KVCache, activation_dtype


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name (tied ones once; ``functional_call`` re-ties them)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class DecodeStep(nn.Module):
    """What is exported: one decode step over cache tensors and weights given as inputs, attending over
    ``static_len`` slots. The model is held outside the module tree, so none of its tensors become constants."""

    def __init__(self, model: nn.Module, static_len: int):
        super().__init__()
        self._model = (model,)
        self.names = list(_state(model))
        self.static_len = static_len

    def weights(self) -> list[torch.Tensor]:
        state = _state(self._model[0])
        return [state[n] for n in self.names]

    def forward(self, ids, positions, kv: list[torch.Tensor], weights: list[torch.Tensor]):
        n = len(kv) // 2
        cache = KVCache.from_tensors(kv[:n], kv[n:], static_len=self.static_len)
        return torch.func.functional_call(self._model[0], dict(zip(self.names, weights)), (ids, positions, cache))


def _sources_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in ("models", "quant/modules.py", "runtime/kv_cache.py", "compiler/aot.py", "compiler/autotune.py"):
        p = root / rel
        for f in sorted(p.glob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def package_key(model: nn.Module, cache_shape: tuple, static_len: int) -> str:
    """What determines the compiled code: module tree, config, cache tensors' shape, attended length, dtypes,
    our sources, the CPU and torch."""
    from .autotune import cpu_key

    h = hashlib.sha256()
    from .. import kernels

    h.update(json.dumps([repr(model), repr(model.config), list(cache_shape), static_len, str(activation_dtype(model)),
                         _sources_digest(), kernels.ops_digest(), cpu_key(), torch.__version__]).encode())
    return h.hexdigest()[:24]


def compile_package(model: nn.Module, cache: KVCache, static_len: int, path: Path) -> None:
    """Export the decode step at (1..cache.batch rows, ``static_len``) and compile it into ``path``."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path.parent / "inductor"))
    import torch._inductor
    from torch.export import Dim

    step = DecodeStep(model, static_len).eval()
    B = cache.batch
    ids = torch.zeros(B, 1, dtype=torch.long)
    pos = torch.zeros(B, 1, dtype=torch.long)
    kv, weights = list(cache.k) + list(cache.v), step.weights()
    dyn = None
    if B > 1:  # the example batch is the planned one (>= 2, so export does not specialize it to 1)
        b = Dim("batch", min=1, max=B)
        dyn = ({0: b}, {0: b}, [None] * len(kv), [None] * len(weights))
    with torch.no_grad():
        ep = torch.export.export(step, (ids, pos, kv, weights), dynamic_shapes=dyn, strict=False)
    big = {k: tuple(v.shape) for k, v in ep.constants.items() if v.numel() > 4096}
    if big:  # a tensor reached the step other than through module state (it would be copied into the package)
        raise RuntimeError(f"the decode step captured tensors that are not module state: {list(big)[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    os.replace(tmp, path)


class CompiledStep:
    """A loaded package, called with the model's own tensors (shared, not copied)."""

    def __init__(self, path: Path, model: nn.Module, static_len: int):
        self.static_len = static_len
        self._step = DecodeStep(model, static_len)
        self._weights = self._step.weights()
        # the C++ loader itself (what torch._inductor.aoti_load_package wraps): serving needs neither inductor's
        # nor Dynamo's Python modules, which cost seconds to import and ~100 MB of memory
        from .. import kernels

        kernels.load_ops()  # a package may call our operators: they must be registered before it loads
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self._run = loader.boxed_run

    def __call__(self, ids, positions, cache: KVCache):
        return self._run([ids, positions, *cache.k, *cache.v, *self._weights])[0]
