"""Continuous (iteration-level) batching over one static KV cache, for the server.

Each ``step()``: drop cancelled and timed-out requests, admit queued ones (highest priority first, with
aging so low priorities do not starve) while a cache row is free and the KV budget holds their whole
reservation (prompt + max_tokens), run one prefill forward over the next chunks of the admitted prompts (at
most ``prefill_chunk`` tokens in all, oldest first), then one batched decode step
for every running request. New requests join at the next step and finished ones leave at once, so a long
prompt is cut into chunks interleaved with everybody else's decode. A request's events go to its ``sink``
(a thread-safe callable); ``step`` runs on one thread (the engine's), the server lives on another.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ContextLengthExceededError, OpenAutoGLMError
from .generate import IncrementalDetokenizer, _release, advance
from .kv_cache import KVCache, model_device
from .sampler import SamplingParams, make_generator, sample


class QueueFullError(OpenAutoGLMError):
    """The waiting queue is full; retry later."""

    http_status = 429
    code = "rate_limit_exceeded"


class ShuttingDownError(OpenAutoGLMError):
    http_status = 503
    code = "server_shutting_down"


@dataclass
class Event:
    """Output of one step for one request."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    priority: int = 0
    timeout_s: float | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    # state, owned by the scheduler thread
    slot: int | None = None
    prefilled: int = 0
    out_ids: list[int] = field(default_factory=list)
    next_input: int | None = None
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def max_new(self) -> int:
        return self.params.max_tokens

    @property
    def reservation(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


class Scheduler:
    def __init__(self, model, tokenizer, eos_ids: set[int], max_batch: int = 16, max_queue: int = 64,
                 max_len: int | None = None, prefill_chunk: int = 512, kv_budget_tokens: int | None = None,
                 aging_s: float = 5.0, on_metrics: Callable | None = None):
        self.model, self.tok, self.eos_ids = model, tokenizer, set(eos_ids)
        ctx = model.config.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.max_batch, self.max_queue, self.chunk, self.aging_s = max_batch, max_queue, prefill_chunk, aging_s
        self.kv_budget_tokens = kv_budget_tokens or max_batch * self.max_len
        self.cache = KVCache.for_model(model, max_batch, self.max_len)
        self.bytes_per_token = self.cache.nbytes // (max_batch * self.max_len)
        self.device = model_device(model)
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.free_slots = list(range(max_batch))
        self.reserved = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.accepting = True
        self.on_metrics = on_metrics or (lambda *a, **k: None)
        self._ids = itertools.count()

    # ---- called from other threads ------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down")
        if len(req.prompt_ids) == 0:
            raise ContextLengthExceededError("the prompt is empty")
        if req.reservation > self.max_len:
            raise ContextLengthExceededError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the context "
                f"length {self.max_len}; shorten the prompt or lower max_tokens"
            )
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting); retry later")
            req.id = req.id or f"req-{next(self._ids)}"
            req.generator = make_generator(req.params.seed)
            req.detok = IncrementalDetokenizer(self.tok)
            self.queue.append(req)
        self.wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self.wake.set()

    def stats(self) -> dict:
        with self.lock:
            return {"queue_depth": len(self.queue), "running": len(self.running),
                    "kv_bytes_in_use": sum(len(r.prompt_ids) + len(r.out_ids) for r in self.running)
                    * self.bytes_per_token,
                    "kv_bytes_reserved": self.reserved * self.bytes_per_token}

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running

    # ---- the engine thread --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.idle:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            self.step()

    def step(self) -> None:
        now = time.monotonic()
        with self.lock:
            for r in list(self.queue):
                reason = self._expired(r, now)
                if reason:
                    self.queue.remove(r)
                    self._finish(r, reason)
            for r in list(self.running):
                reason = self._expired(r, now)
                if reason:
                    self._finish(r, reason)
            self._admit(now)
            running = list(self.running)
        prefilling = sorted((r for r in running if r.prefilled < len(r.prompt_ids)), key=lambda r: r.arrival)
        if prefilling:
            budget, batch = self.chunk, []
            for r in prefilling:  # oldest first, up to `chunk` prompt tokens per step in all
                n = min(len(r.prompt_ids) - r.prefilled, budget)
                if n <= 0:
                    break
                batch.append((r, n))
                budget -= n
            self._prefill(batch)
        # by cache row: when the rows form a run, the cache is read as a view instead of gathered
        decoding = sorted((r for r in running if r.next_input is not None and r.finish_reason is None),
                          key=lambda r: r.slot)
        if decoding:
            self._decode(decoding)
        self.on_metrics(self.stats())

    def _expired(self, r: Request, now: float) -> str | None:
        if r.cancelled:
            return "cancelled"
        if r.timeout_s is not None and now - r.arrival > r.timeout_s:
            return "timeout"
        return None

    def _admit(self, now: float) -> None:
        # effective priority grows with waiting time, so old low-priority requests are eventually served
        order = sorted(self.queue, key=lambda r: (-(r.priority + (now - r.arrival) / self.aging_s), r.arrival))
        for r in order:
            if not self.free_slots or self.reserved + r.reservation > self.kv_budget_tokens:
                break
            self.queue.remove(r)
            r.slot = self.free_slots.pop(0)
            self.reserved += r.reservation
            self.running.append(r)

    def _free(self, r: Request) -> None:
        """Give back r's cache row and reservation. Caller holds the lock."""
        if r in self.running:
            self.running.remove(r)
            self.free_slots.append(r.slot)
            self.free_slots.sort()
            self.reserved -= r.reservation

    def _finish(self, r: Request, reason: str) -> None:
        """End r from outside the token path (cancelled, timeout). Caller holds the lock."""
        r.finish_reason = reason
        self._free(r)
        r.sink(Event(_release(r, final=True), finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=len(r.out_ids)))

    def _prefill(self, batch: list[tuple[Request, int]]) -> None:
        """One forward over the next ``n`` prompt tokens of each request, right-padded to a common length.

        Padding writes land in the row's own cache beyond its current length, where the mask hides them until
        the row's real tokens overwrite them."""
        T = max(n for _, n in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.empty(len(batch), T, dtype=torch.long)
        for i, (r, n) in enumerate(batch):
            ids[i, :n] = torch.tensor(r.prompt_ids[r.prefilled : r.prefilled + n])
            pos[i] = torch.arange(r.prefilled, r.prefilled + T).clamp_(max=self.max_len - 1)
        self.cache.select(torch.tensor([r.slot for r, _ in batch], device=self.device))
        last = torch.tensor([n - 1 for _, n in batch], device=self.device)
        with torch.inference_mode():
            logits = self.model(ids.to(self.device), pos.to(self.device), self.cache, logits_at=last)
        for i, (r, n) in enumerate(batch):
            r.prefilled += n
            if r.prefilled == len(r.prompt_ids):
                self._take(r, logits[i])

    def _decode(self, rs: list[Request]) -> None:
        ids = torch.tensor([[r.next_input] for r in rs], device=self.device)
        pos = torch.tensor([[len(r.prompt_ids) + len(r.out_ids) - 1] for r in rs], device=self.device)
        self.cache.select(torch.tensor([r.slot for r in rs], device=self.device))
        with torch.inference_mode():
            logits = self.model(ids, pos, self.cache)[:, -1]
        toks = sample(logits, [r.params for r in rs], [r.generator for r in rs],
                      [r.prompt_ids + r.out_ids for r in rs] if any(r.params.repetition_penalty != 1 for r in rs) else None)
        lps = torch.log_softmax(logits.float(), -1) if any(r.logprobs is not None for r in rs) else None
        for i, r in enumerate(rs):
            self._emit(r, int(toks[i]), None if lps is None else lps[i])

    def _take(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the first token from the prefill logits."""
        tok = sample(logits[None], [r.params], [r.generator], [r.prompt_ids] if r.params.repetition_penalty != 1 else None)
        lp = torch.log_softmax(logits.float(), -1) if r.logprobs is not None else None
        self._emit(r, int(tok[0]), lp)

    def _emit(self, r: Request, tok: int, lp: torch.Tensor | None) -> None:
        now = time.monotonic()
        itl = None if r.last_token_at is None else now - r.last_token_at
        if r.first_token_at is None:
            r.first_token_at = now
            self.on_metrics(None, ttft=now - r.arrival)
        r.last_token_at = now
        logprob = top = None
        if lp is not None:
            logprob = float(lp[tok])
            if r.logprobs:
                v, i = torch.topk(lp, r.logprobs)
                top = list(zip(i.tolist(), v.tolist()))
        n = len(r.out_ids)
        piece = advance(r, tok, self.eos_ids)
        appended = len(r.out_ids) > n
        if appended:
            r.next_input = tok
            self.on_metrics(None, token=True, itl=itl)
        ev = Event(piece, tok if appended else None, logprob if appended else None, top if appended else None,
                   r.finish_reason, len(r.prompt_ids), len(r.out_ids))
        if r.finish_reason:
            with self.lock:
                self._free(r)
        r.sink(ev)

    def shutdown(self, drain_timeout: float = 30.0, stop: threading.Event | None = None) -> None:
        """Stop accepting; let running and queued requests finish for up to ``drain_timeout``, then cancel."""
        self.accepting = False
        t0 = time.monotonic()
        while not self.idle and time.monotonic() - t0 < drain_timeout:
            time.sleep(0.05)
        with self.lock:
            for r in list(self.queue) + list(self.running):
                r.cancelled = True
        self.wake.set()

