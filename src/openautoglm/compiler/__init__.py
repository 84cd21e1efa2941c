"""Compiler: optimize levels O0-O3 over a loaded (optionally quantized) model.

- O0: the eager reference, the oracle for everything below.
- O1: load-time passes (``passes/``: QKV and gate-up fusion, float or quantized; RMSNorm folding where exact;
  dead-op removal), RoPE tables constant-folded at load (``RotaryTables``), and a static memory plan: the KV
  cache is allocated once at compile time from the plan and reused by every generation that fits.
- O2: O1 plus the decode step exported and compiled ahead of time by AOTInductor (inductor's C++ backend) over
  the planned cache: the batch dynamic up to the plan, the attended length rounded up to a bucket (one package
  each), so nothing is traced or compiled during a generation and no guards run per step. Packages go to
  ``~/.cache/openautoglm/aoti``, so a second start loads them (``compile_seconds`` reports each start's cost).
- O3: O2 plus the kernel selector (``autotune.py``): per linear shape, format and token-count bucket the
  candidate kernels this CPU offers are timed, the fastest within the quality budget is kept, and choices
  are cached on disk keyed by shape, format, device, CPU flags, torch version and threads; decode's thread
  count is tuned too (prompts run on every thread given: compute-bound, they always gain from them). Candidates
  include our own native kernels (``openautoglm.kernels``): int4 prefill runs as a bf16 GEMM (AMX where present) on weights dequantized per call, keeping no bf16 copy; decode can run our int4/int8
  GEMV operators and our decode attention operator, which the AOTInductor packages call. Where the decode
  attention is chosen and the activations are fp32, the planned KV cache is fp16 (``memory_plan.kv_dtype``).

``kv_dtype`` ("auto" or one of ``runtime.kv_cache.KV_DTYPES``: fp32, bf16, fp16, int8) overrides the planned cache's
dtype at O1+ ("auto": the activations', or fp16 as above). int8 stores each (token, kv head) vector as codes with an
fp16 scale: ~0.52x bf16's bytes, read as stored by the decode attention at O3.

Each pass lives in ``passes/`` (one per file), rewrites a model in place, and has an equivalence test.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

from ..host import cache_root

# order matters: fusions run first, so folding scales the fused weights once; dead ops go last
PASSES = ("fuse_qkv", "fuse_gate_up", "fold_rmsnorm", "dead_ops")
LEN_BUCKET = 128  # O2+: decode attends over the context rounded up to a multiple of this


def get_pass(name: str):
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; passes: {', '.join(PASSES)}")
    return importlib.import_module(f"{__name__}.passes.{name}").apply


def run_passes(model, names=PASSES) -> dict[str, int]:
    """Apply the named passes in the canonical order; returns how many sites each rewrote."""
    return {n: get_pass(n)(model) for n in PASSES if n in names}


@dataclass
class Compiled:
    level: str
    runner: object  # what generation calls: the model, or the compiled wrapper
    passes: dict = field(default_factory=dict)
    plan: object = None  # MemoryPlan
    cache: object = None  # the planned KVCache
    len_bucket: int | None = None
    compile_seconds: float = 0.0
    autotune: dict = field(default_factory=dict)
    #: the tokens whose keys and values row 0 of ``cache`` holds after the last single-prompt generation
    #: (``runtime.generate.Generation``'s prefix reuse); emptied by anything else that writes the cache, and to be
    #: emptied by whoever edits the weights in place (the cached keys and values are the old weights')
    session: dict = field(default_factory=lambda: {"ids": None})

    def info(self) -> dict:
        return {"level": self.level, "passes": self.passes, "memory_plan": self.plan.to_dict() if self.plan else None,
                "compile_seconds": round(self.compile_seconds, 3), "autotune": self.autotune}


def compile_model(model, level: str, max_batch: int = 1, max_len: int | None = None, prefill_tokens: int = 512,
                  progress: bool = True, kv_dtype: str = "auto") -> Compiled:
    """Prepare ``model`` (in place) at ``level``; returns what generation runs and the plan."""
    import torch

    from . import memory_plan
    from ..runtime.kv_cache import KV_DTYPES, KVCache, activation_dtype

    if kv_dtype != "auto" and kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; choose auto, {', '.join(KV_DTYPES)}")
    t0 = time.perf_counter()
    if level == "O0":
        return Compiled("O0", model)
    from ..sysmem import keep_freed_memory, return_freed_memory

    passes = run_passes(model)
    # the layers the passes fused away: their memory goes back before freed memory is kept from here on
    return_freed_memory()
    keep_freed_memory()  # prefill's large temporaries reuse memory instead of faulting pages in at every call
    max_len = min(max_len or 2048, model.config.max_position_embeddings)
    prefill_tokens = min(prefill_tokens, max_len)
    dtype = kv = activation_dtype(model)
    autotune = {}
    if level == "O3":
        from .autotune import tune_model

        autotune = tune_model(model, max_batch=max_batch, prefill_tokens=prefill_tokens, progress=progress,
                              kv_len=max_len)
        if autotune["attention"] == "decode" and dtype == torch.float32:
            kv = torch.float16  # what the decode attention was tuned on: half the cache's bytes to read
    if kv_dtype != "auto":
        kv = KV_DTYPES[kv_dtype]
    # (after tuning: layers whose choices all read the portable codes build no CPU pack)
    plan = memory_plan.plan(model, max_batch, max_len, prefill_tokens, dtype, kv)
    cache = KVCache.for_model(model, max_batch, max_len, dtype=kv)
    out = Compiled(level, model, passes, plan, cache)
    if level in ("O2", "O3"):
        from .compiled import CompiledLM

        out.runner = CompiledLM(model, cache, cache_dir=cache_root() / "aoti")
        out.len_bucket = LEN_BUCKET
        out.autotune = autotune
        # the first 4 buckets; a plan for several rows (a server's, which never compiles while serving) also the
        # planned length, which runs any longer context on a compiled step (the mask hides the slots beyond each
        # row's position). The other buckets compile on first use in a generation, once per machine.
        lens = list(range(LEN_BUCKET, max_len + LEN_BUCKET, LEN_BUCKET))[:4] + ([max_len] if max_batch > 1 else [])
        out.runner.warm_up(sorted({min(n, max_len) for n in lens}), progress=progress)
    out.compile_seconds = time.perf_counter() - t0
    torch.set_grad_enabled(True)
    return out
