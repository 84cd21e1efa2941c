"""O2's compiled decode step: exported with ``torch.export`` and compiled ahead of time by AOTInductor (inductor's
C++ backend, cpp wrapper) into a package on disk, one per attended-length bucket.

The step is ``(ids (B, 1), positions (B, 1), kv) -> logits``: the KV cache tensors are inputs, written in place by
the compiled code, so prefill (eager) and decode (compiled) share one cache. The model's tensors are the package's
constants, but not stored in it (``package_constants_in_so=False``): at load they are handed to the compiled model
as user-managed constants, the model's own tensors (no copy), so the package holds code only and the weights are in
memory once. (Passing the ~450 weights as inputs instead cost ~0.4 ms a step: each goes through pybind and an AOTI
tensor handle on every call.) The batch is a dynamic dimension
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
    """The module's tensors by every name they have (a tied tensor under each of its names)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


class DecodeStep(nn.Module):
    """What is exported: one decode step over the cache tensors given as inputs, attending over ``static_len`` slots.
    The model is a submodule: its parameters and buffers become the package's constants."""

    def __init__(self, model: nn.Module, static_len: int):
        super().__init__()
        self.model = model
        self.static_len = static_len

    def forward(self, ids, positions, kv: list[torch.Tensor]):
        cache = KVCache.from_tensors(kv, static_len=self.static_len)
        return self.model(ids, positions, cache)


def _sources_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in ("models", "quant/modules.py", "runtime/kv_cache.py", "compiler/aot.py", "compiler/autotune.py"):
        p = root / rel
        for f in sorted(p.glob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def package_key(model: nn.Module, cache_shape: tuple, static_len: int, kv_dtype: torch.dtype) -> str:
    """What determines the compiled code: module tree, config, cache tensors' shape and dtype, attended length,
    dtypes, our sources, the CPU and torch."""
    from ..host import cpu_key

    h = hashlib.sha256()
    from .. import kernels

    h.update(json.dumps([repr(model), repr(model.config), list(cache_shape), str(kv_dtype), static_len,
                         str(activation_dtype(model)),
                         _sources_digest(), kernels.ops_digest(), cpu_key(), torch.__version__]).encode())
    return h.hexdigest()[:24]


def compile_package(model: nn.Module, cache: KVCache, static_len: int, path: Path) -> None:
    """Export the decode step at (1..cache.batch rows, ``static_len``) and compile it into ``path``."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path.parent / "inductor"))
    import torch._inductor
    from torch.export import Dim

    from .. import kernels

    step = DecodeStep(model, static_len).eval()
    B = cache.batch
    ids = torch.zeros(B, 1, dtype=torch.long)
    pos = torch.zeros(B, 1, dtype=torch.long)
    kv = cache.tensors()
    dyn = None
    if B > 1:  # the example batch is the planned one (>= 2, so export does not specialize it to 1)
        b = Dim("batch", min=1, max=B)
        dyn = ({0: b}, {0: b}, [None] * len(kv))
    with torch.no_grad():
        ep = torch.export.export(step, (ids, pos, kv), dynamic_shapes=dyn, strict=False)
    state = _state(step)
    big = {k: tuple(v.shape) for k, v in ep.constants.items() if k not in state and v.numel() > 4096}
    if big:  # a tensor reached the step other than through module state (it would be copied into the package)
        raise RuntimeError(f"the decode step captured tensors that are not module state: {list(big)[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    with _inductor_made_constants() as made:
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp), inductor_configs={
            "aot_inductor.package_constants_in_so": False,
            # our operators are called through their C entry points, not boxed through the proxy executor
            "aot_inductor.custom_ops_to_c_shims": kernels.c_shims()})
    big = [n for n, t in made.items() if t.numel() > 4096]
    if big:
        raise RuntimeError(f"the decode step's compilation made large constants: {big[:5]}")
    # the package leaves every constant out, inductor's own too: they go beside it, written before it (a package
    # on disk always has its constants file)
    side = constants_file(path)
    side_tmp = side.with_name(f"{side.name}.{os.getpid()}.tmp")
    torch.save({n: t.clone() for n, t in made.items()}, side_tmp)
    os.replace(side_tmp, side)
    os.replace(tmp, path)


def constants_file(path: Path) -> Path:
    """Where the constants inductor made for the package at ``path`` are kept."""
    return path.with_suffix(".constants.pt")


class _inductor_made_constants:
    """Records the constants inductor creates while lowering (tensors that are no module state, such as a scalar
    argument it turns into a 0-d tensor), by the names the compiled model knows them by. Patches
    ``GraphLowering.allocate_non_dup_const_name`` (torch 2.13) for the duration."""

    def __enter__(self) -> dict[str, torch.Tensor]:
        from torch._inductor.graph import GraphLowering

        self.made: dict[str, torch.Tensor] = {}
        self.orig = orig = GraphLowering.allocate_non_dup_const_name
        made = self.made

        def allocate(graph, name, data):
            out = orig(graph, name, data)
            if name is None:  # module state comes with its name; what lowering makes comes without
                made[out] = data
            return out

        GraphLowering.allocate_non_dup_const_name = allocate
        return made

    def __exit__(self, *exc) -> None:
        from torch._inductor.graph import GraphLowering

        GraphLowering.allocate_non_dup_const_name = self.orig


class CompiledStep:
    """A loaded package whose constants are the model's own tensors (user-managed: shared, not copied)."""

    def __init__(self, path: Path, model: nn.Module, static_len: int):
        self.static_len = static_len
        # the C++ loader itself (what torch._inductor.aoti_load_package wraps): serving needs neither inductor's
        # nor Dynamo's Python modules, which cost seconds to import and ~100 MB of memory
        from .. import kernels

        kernels.load_ops()  # a package may call our operators: they must be registered before it loads
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        side = constants_file(path)
        made = torch.load(side, weights_only=True) if side.is_file() else {}
        state = {**made, **_state(DecodeStep(model, static_len))}
        names = loader.get_constant_fqns()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"the decode package {path.name} wants constants the model lacks: {missing[:5]}")
        # the package holds no weights: its constants point at the model's tensors (user-managed: AOTI neither
        # copies nor owns them), so the step keeps a reference to each, valid whatever later happens to the model
        self._constants = {n: state[n] for n in names}
        loader.load_constants(self._constants, False, True, True)
        self._loader = loader
        self._run = loader.boxed_run

    def __call__(self, ids, positions, cache: KVCache):
        return self._run([ids, positions, *cache.tensors()])[0]
