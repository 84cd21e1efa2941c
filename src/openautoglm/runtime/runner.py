"""The one thing that runs a model: ``ModelRunner`` owns the KV cache, the length buckets and the decode step
(compiled or not), and everything that generates drives it: ``Generation`` (run, chat, infer), the server's
``Scheduler`` and ``eval``'s decode path. Nobody else selects cache rows or sets attended lengths (gpt-fast's
``decode_one_token`` with ``setup_caches``; mlx-lm's ``generate_step`` that its generate, server and eval share).

A runner wraps what the engine was compiled to (``Engine.model_runner()``):

- O0 or uncompiled: the eager model; each claim allocates a cache of the size asked for.
- O1: the passes-applied model and its planned cache (``max_batch`` rows of ``max_len``), reused by every claim
  that fits.
- O2/O3: the same, and a decode step whose rows are cache rows 0..B-1 runs the compiled package for its attended
  length: the context rounded up to the length bucket (``compiler/compiled.py``). ``compile_missing=False`` (a
  server, which never compiles while serving) runs a length that has no built step on the next longer one that
  has (the mask hides the slots beyond each row's position), else eager.

The planned cache's row 0 may still hold the keys and values of the last single-row generation (``session``):
:meth:`claim` hands that prefix back to a caller that can reuse it, and :meth:`keep` records it.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.layers import batch_invariant
from .kv_cache import KVCache, activation_dtype, model_device


class ModelRunner:
    def __init__(self, model, cache: KVCache | None = None, len_bucket: int | None = None,
                 session: dict | None = None, compile_missing: bool = True, prefill_threads: int | None = None):
        """``model``: what runs the forwards (the eager model, or a compiled ``CompiledLM``); ``cache``: its
        planned cache, or None; ``len_bucket``: the decode step's attended-length granularity (compiled runners);
        ``session``: ``{"ids": ...}``, the tokens whose keys and values the planned cache's row 0 holds;
        ``prefill_threads``: the intra-op threads prompts run on where O3 tuned decode to fewer (compute-bound
        prefill wants every core; memory-bound decode may not)."""
        self.model, self.config = model, model.config
        self.planned, self.len_bucket = cache, len_bucket if cache is not None else None
        self.session = session if cache is not None else None
        self.compile_missing = compile_missing
        self.prefill_threads = prefill_threads
        #: every attention computes each query as it would alone (``models.layers.batch_invariant``): the server's
        #: scheduler sets it, so that a request's tokens do not depend on the batch, chunking or cached prefix
        self.invariant = False
        self.device = model_device(model)
        self.cache: KVCache | None = cache
        self.compiled_steps = 0  # decode steps that ran a compiled package
        self._steps: dict[int, bool] = {}  # attended length -> has a compiled step (asked once a length)

    @classmethod
    def for_engine(cls, engine, compile_missing: bool = True) -> "ModelRunner":
        c = getattr(engine, "compiled", None)
        if c is None or c.cache is None:
            return cls(engine.model if c is None else c.runner)
        return cls(c.runner, c.cache, c.len_bucket, c.session, compile_missing,
                   (c.autotune or {}).get("prefill_threads"))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the forwards compute in: the engine's runtime dtype (``Engine(dtype=...)``, set at load)."""
        return activation_dtype(self.model)

    # ---- the cache --------------------------------------------------------------------------------------
    def claim(self, batch: int, length: int) -> list[int] | None:
        """Run the next forwards on rows 0..batch-1 of a cache with at least ``length`` slots: the planned one when
        it fits, else a new one. Returns the tokens the planned cache's row 0 still holds from the last single-row
        generation (a prefix the caller may reuse), or None. That record is cleared: row 0 is about to change."""
        held = self.session.get("ids") if self.session is not None else None
        if self.session is not None:
            self.session["ids"] = None
        if self.planned is not None and self.planned.batch >= batch and self.planned.max_len >= length:
            self.cache = self.planned  # (rows 0..batch-1: the compiled step's rows)
            return held
        self.cache = KVCache.for_model(self.model, batch, length)
        return None

    def keep(self, ids: list[int]) -> None:
        """Row 0 of the planned cache holds the keys and values of ``ids`` (from slot 0)."""
        if self.session is not None and self.cache is self.planned:
            self.session["ids"] = list(ids)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy cache row ``src``'s first ``length`` slots to row ``dst``."""
        self.cache.move_row(src, dst, length)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        self.cache.swap_rows(a, b, length)

    @property
    def bytes_per_token(self) -> int:
        return self.cache.nbytes // (self.cache.batch * self.cache.max_len)

    # ---- forwards ---------------------------------------------------------------------------------------
    def _select(self, rows) -> None:
        if rows is None:
            self.cache.select(None)
        else:
            self.cache.select(torch.as_tensor(rows, dtype=torch.long, device=self.device))

    def prefill(self, ids: torch.Tensor, positions: torch.Tensor, rows=None, logits_at=None) -> torch.Tensor:
        """A forward over ``ids`` (B, T) at ``positions`` (B, T) on cache rows ``rows`` (None: 0..B-1); the logits
        at ``logits_at`` (B,) per row, else at every position. Prompts run the eager model (large GEMMs)."""
        self._select(rows)
        self.cache.static_len = None
        was = torch.get_num_threads()
        if self.prefill_threads and self.prefill_threads != was:
            torch.set_num_threads(self.prefill_threads)
        try:
            with torch.inference_mode(), batch_invariant(self.invariant):
                return self.model(ids.to(self.device), positions.to(self.device), self.cache,
                                  None if logits_at is None else logits_at.to(self.device))
        finally:
            if torch.get_num_threads() != was:
                torch.set_num_threads(was)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor, rows=None, context: int | None = None) -> torch.Tensor:
        """One token a row: ``ids`` and ``positions`` (B,), on cache rows ``rows`` (None: 0..B-1); the logits
        (B, V). ``context``: the slots the step must attend (default: the furthest position + 1); a caller that
        wants one compiled shape for a whole generation passes its final length."""
        B = ids.shape[0]
        leading = rows is None or list(rows) == list(range(B))  # rows 0..B-1: what a compiled step runs
        static = self._static_len(leading, int(positions.max()) + 1 if context is None else context)
        self._select(None if leading else rows)
        self.cache.static_len = static
        try:
            # (the context only where asked: this is every token's path)
            with torch.inference_mode(), batch_invariant() if self.invariant else contextlib.nullcontext():
                out = self.model(ids[:, None].to(self.device), positions[:, None].to(self.device), self.cache)[:, -1]
        finally:
            self.cache.static_len = None
        self.compiled_steps += static is not None and hasattr(self.model, "has_step")
        return out

    def _static_len(self, leading: bool, context: int) -> int | None:
        """The attended length a decode step runs at: the context rounded up to the bucket on the planned cache's
        rows 0..B-1 (``leading``: a compiled step's shape); None elsewhere (eager, attending over what it needs)."""
        b = self.len_bucket
        if not b or self.cache is not self.planned or not leading:
            return None
        top = self.cache.max_len
        n = min(-(-context // b) * b, top)
        has = getattr(self.model, "has_step", None)
        if has is None or self.compile_missing:
            return n  # (a length first seen compiles once, on first use)
        for m in [*range(n, top, b), top]:
            ok = self._steps.get(m)
            if ok is None:  # asked once a length: nothing compiles while this runner serves, so the answer holds
                ok = self._steps[m] = bool(has(m))
            if ok:
                return m
        return None
