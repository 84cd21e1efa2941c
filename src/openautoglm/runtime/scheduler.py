"""Continuous (iteration-level) batching over one static KV cache, for the server.

Each ``step()``: drop cancelled and timed-out requests, admit queued ones (highest priority first, with
aging so low priorities do not starve) while a cache row is free and the KV budget holds their whole
reservation (prompt + max_tokens), run one prefill forward over the next chunks of the admitted prompts (at
most ``prefill_chunk`` tokens in all, oldest first), then one batched decode step
for every running request. New requests join at the next step and finished ones leave at once, so a long
prompt is cut into chunks interleaved with everybody else's decode. A request's events go to its ``sink``
(a thread-safe callable); ``step`` runs on one thread (the engine's), the server lives on another.

On a compiled engine (O2/O3) the scheduler runs in the runner's planned cache and its decode steps run the
compiled step (``compiler/compiled.py``), which takes cache rows 0..B-1 at any positions and attends over a
static length bucket: before each decode step the decoding requests are compacted onto rows 0..D-1 (a request
moves to a free row, or trades rows with one still prefilling; only when requests join or leave), and the step
attends over their longest context rounded up to the bucket. A bucket whose step was never built on this
machine (beyond the warmed-up lengths), or a plan smaller than the server's, decodes eager; prefill always runs
the eager model (its GEMMs are large) on the same cache.

Prefix caching (on unless ``prefix_cache=False``), as llama-server's slots and SGLang's radix cache do it over
rows: a cache row keeps the keys and values of the tokens it was given (prompt and generated) after its request
leaves, until the row is needed again. A new request takes the free row whose kept tokens share the longest
prefix with its prompt (else an empty row, else the least recently freed one), and before its first prefill
chunk it copies a longer shared prefix from any other row (running or kept) when there is one, so it prefills
only the rest; at least the prompt's last token is always computed, for its logits. A request whose prompt
shares more with an older request still prefilling waits for that one to write it (by at least
``PREFIX_WAIT_MIN`` tokens) instead of computing the same keys twice: 16 requests on one long system prompt
prefill it once. ``Request.cached`` counts a request's prompt tokens that came from the cache.

Faults: an exception in a step's batched forward or sampling re-runs that step's rows one by one (rewriting
the same cache positions is harmless), so a fault that belongs to one request fails that request alone
(``finish_reason="error"``) and a transient fault fails nobody (a sampled row of a re-run step draws again from
its generator, so a seeded request's text may differ after a fault). Per-request bookkeeping (sampling the first
token, detokenizing, stop strings, the sink) is guarded request by request. A step counts as failed when an
exception escapes those guards, or when all its requests failed and the model fails a one-token probe too (so
a bad request sent again and again is not a crash); ``max_failures`` failed steps within ``failure_window_s``
make the scheduler fatal: it fails everything it holds, stops accepting, and ``run`` returns, so the process
can exit and a supervisor restart it. ``last_progress`` feeds the server's watchdog.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ContextLengthExceededError, OpenAutoGLMError
from .generate import IncrementalDetokenizer, _release, advance
from .grammar import MaskJob, constraint_for
from .runner import ModelRunner
from .sampler import SamplingParams, make_generator, sample


class QueueFullError(OpenAutoGLMError):
    """The waiting queue is full; retry later."""

    http_status = 429
    code = "rate_limit_exceeded"


class ShuttingDownError(OpenAutoGLMError):
    http_status = 503
    code = "server_shutting_down"


log = logging.getLogger("openautoglm.scheduler")

PREFIX_WAIT_MIN = 16  # a request waits for an older one's prefill only to reuse at least this many more tokens


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
    error: str | None = None  # with finish_reason "error": one line for the client (no traceback, no prompt)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


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
    constraint: object = None  # runtime.grammar.Constraint of a request with a grammar
    fed: int = 0  # generated tokens whose keys and values its cache row holds (decode steps committed)
    cached: int = 0  # prompt tokens taken from the prefix cache instead of computed
    matched: bool = False  # the prefix cache was consulted (before the first prefill chunk)

    @property
    def max_new(self) -> int:
        return self.params.max_tokens

    @property
    def reservation(self) -> int:
        return len(self.prompt_ids) + self.params.max_tokens


class Scheduler:
    def __init__(self, model, tokenizer, eos_ids: set[int], max_batch: int = 16, max_queue: int = 64,
                 max_len: int | None = None, prefill_chunk: int = 512, kv_budget_tokens: int | None = None,
                 aging_s: float = 5.0, on_metrics: Callable | None = None, max_failures: int = 3,
                 failure_window_s: float = 60.0, on_idle: Callable[["Scheduler"], None] | None = None,
                 prefix_cache: bool = True):
        """``model``: what runs the forwards, a :class:`ModelRunner` (an engine's: on its planned cache when that
        holds ``max_batch`` rows of ``max_len``, its decode steps then on the compiled step, with the rows kept at
        cache rows 0..B-1, see :meth:`_compact`), or a model, run eagerly. ``on_idle``: called on the scheduler
        thread while nothing is queued or running (a safe point to :meth:`rebind` to a faster runner).
        ``prefix_cache``: reuse the keys and values of shared prompt prefixes (see the module's docstring)."""
        self.tok, self.eos_ids = tokenizer, set(eos_ids)
        ctx = model.config.max_position_embeddings
        self.max_len = min(max_len or ctx, ctx)
        self.max_batch, self.max_queue, self.chunk, self.aging_s = max_batch, max_queue, prefill_chunk, aging_s
        self.kv_budget_tokens = kv_budget_tokens or max_batch * self.max_len
        self.prefix_cache = prefix_cache
        self.kept: dict[int, list[int]] = {}  # free cache row -> the tokens whose keys/values it holds from slot 0
        self.kept_at: dict[int, float] = {}  # when that row was freed (the least recently freed is reused first)
        self.rebind(model)
        self.on_idle = on_idle
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.free_slots = list(range(max_batch))
        self.reserved = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.accepting = True
        self.on_metrics = on_metrics or (lambda *a, **k: None)
        self._ids = itertools.count()
        self.max_failures, self.failure_window_s = max_failures, failure_window_s
        self.failures: deque[float] = deque()  # times of failed steps within the window
        self.faults = 0  # requests failed by an exception, in all
        self.fatal: str | None = None  # why the scheduler gave up; set once, then run() returns
        self.last_progress = time.monotonic()  # end of the last step (or idle tick): the watchdog's clock
        self.row_moves = self.row_swaps = 0  # cache rows moved / traded to keep decoding rows at 0..D-1
        self.prompt_tokens = self.cached_tokens = 0  # prompt tokens of matched requests, and those from the cache

    def rebind(self, model) -> None:
        """Run on ``model`` (a runner or a model) from now on. Only while idle (no request holds a cache row)."""
        if getattr(self, "running", None):
            raise RuntimeError("rebind while requests are running")
        runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
        runner.compile_missing = False  # never compile while serving
        # a request's tokens must not depend on what it is batched with, how its prompt is chunked or whether its
        # prefix came from the cache: each query's attention as it is alone (models.layers.batch_invariant)
        runner.invariant = True
        # every row is ours from now on (a plan smaller than the server's: eager over a cache of our own)
        runner.claim(self.max_batch, self.max_len)
        self.runner, self.model = runner, runner.model
        self.compact = runner.cache is runner.planned and runner.len_bucket is not None
        self.kept.clear()  # a new cache holds nothing
        self.kept_at.clear()
        self.bytes_per_token = runner.bytes_per_token

    @property
    def compiled_steps(self) -> int:
        """Decode steps the compiled runner ran (the rest ran eager)."""
        return self.runner.compiled_steps

    # ---- called from other threads ------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if self.fatal is not None:
            raise ShuttingDownError(f"the server is stopping after repeated faults: {self.fatal}")
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down")
        if len(req.prompt_ids) == 0:
            raise ContextLengthExceededError("the prompt is empty")
        if req.reservation > self.max_len:
            raise ContextLengthExceededError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.params.max_tokens}) exceeds the context "
                f"length {self.max_len}; shorten the prompt or lower max_tokens"
            )
        req.generator = make_generator(req.params.seed)
        req.detok = IncrementalDetokenizer(self.tok)
        req.constraint = constraint_for(req.params, self.tok, self.model.config.vocab_size, self.eos_ids)
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} waiting); retry later")
            req.id = req.id or f"req-{next(self._ids)}"
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

    def stalled(self, watchdog_s: float) -> str | None:
        """Why the scheduler is not healthy (fatal, or no progress for ``watchdog_s`` with work pending)."""
        if self.fatal is not None:
            return f"the scheduler stopped after repeated faults: {self.fatal}"
        quiet = time.monotonic() - self.last_progress
        if quiet > watchdog_s and not self.idle:
            return (f"no scheduler progress for {quiet:.0f} s with {len(self.running)} running and "
                    f"{len(self.queue)} queued requests")
        return None

    # ---- the engine thread --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Step until ``stop`` is set or the scheduler turns fatal. Never raises."""
        while not stop.is_set() and self.fatal is None:
            if self.idle:
                self.last_progress = time.monotonic()
                if self.on_idle is not None:
                    try:
                        self.on_idle(self)
                    except Exception:
                        log.exception("the idle hook failed")
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                ok = self.step()
            except Exception:  # a fault outside the per-request guards: fail what the step held
                log.exception("scheduler step failed")
                with self.lock:
                    held = list(self.running)
                for r in held:
                    self._fail(r)
                ok = False
            if not ok:
                self._count_failure()

    def _count_failure(self) -> None:
        now = time.monotonic()
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.failure_window_s:
            self.failures.popleft()
        if len(self.failures) >= self.max_failures:
            self.fatal = f"{len(self.failures)} failed steps within {self.failure_window_s:.0f} s"
            log.error("scheduler is giving up: %s", self.fatal)
            self.accepting = False
            with self.lock:
                held = list(self.queue) + list(self.running)
                self.queue.clear()
            for r in held:
                self._fail(r)

    def step(self) -> bool:
        """One iteration. False when it ran requests, all of them failed, and a one-token probe fails too."""
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
        if self.prefix_cache:
            prefilling = [r for r in prefilling if r.matched or self._match(r, prefilling)]
        if prefilling:
            budget, batch = self.chunk, []
            for r in prefilling:  # oldest first, up to `chunk` prompt tokens per step in all
                n = min(len(r.prompt_ids) - r.prefilled, budget)
                if n <= 0:
                    break
                batch.append((r, n))
                budget -= n
            self._guarded(batch, self._prefill_forward, self._prefill_commit)
        decoding = [r for r in running if r.next_input is not None and r.finish_reason is None]
        if decoding and self.compact:
            self._compact(decoding)
        # by cache row: when the rows form a run, the cache is read as a view instead of gathered
        decoding.sort(key=lambda r: r.slot)
        if decoding:
            self._guarded(decoding, self._decode_forward, self._emit_sampled)
        self.last_progress = time.monotonic()
        self.on_metrics(self.stats())
        if running and all(r.finish_reason == "error" for r in running):
            return self._probe()
        return True

    def _probe(self) -> bool:
        """After a step in which every request failed: can the model still run one token (at position 0 of a
        free cache row, which the next request there overwrites)? If so the fault was the requests' (a bad
        request sent again and again must not bring the server down); if not, the step counts as failed."""
        with self.lock:
            slot = self.free_slots[0] if self.free_slots else None
        if slot is None:
            return False
        self._forget(slot)
        try:
            self.runner.prefill(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), [slot])
            return True
        except Exception:
            log.exception("the model fails on a one-token probe too")
            return False

    def _guarded(self, items: list, compute: Callable, commit: Callable) -> None:
        """``compute`` the batch (one result per item); if it raises, compute each item alone once more, and
        fail the items that raise alone too. Then ``commit`` each result, guarded item by item."""
        try:
            results = list(zip(items, compute(items)))
        except Exception as e:
            log.warning("a step of %d requests failed (%r); retrying them one by one", len(items), e)
            results = []
            for it in items:
                try:
                    results.append((it, compute([it])[0]))
                except Exception as e1:
                    log.error("request %s failed", _req(it).id, exc_info=e1)
                    self._fail(_req(it))
        for it, res in results:
            try:
                commit(it, res)
            except Exception as e:
                log.error("request %s failed", _req(it).id, exc_info=e)
                self._fail(_req(it))

    def _fail(self, r: Request) -> None:
        """End r with ``finish_reason="error"``; safe to call from the scheduler thread at any point."""
        if r.finish_reason == "error":
            return
        self.faults += 1
        r.finish_reason = "error"
        with self.lock:
            if r in self.queue:
                self.queue.remove(r)
            self._free(r)
        msg = "the server hit an internal error while generating this request; it was aborted"
        self._send(r, Event("", finish_reason="error", prompt_tokens=len(r.prompt_ids),
                            completion_tokens=len(r.out_ids), cached_tokens=r.cached, error=msg))

    def _send(self, r: Request, ev: Event) -> None:
        try:
            r.sink(ev)
        except Exception:  # the listener is gone (closed event loop): nobody to tell, free the row
            log.warning("request %s: could not deliver an event; cancelling it", r.id)
            r.cancelled = True

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
            r.slot = self._pick_row(r) if self.prefix_cache else self.free_slots[0]
            self.free_slots.remove(r.slot)
            self.reserved += r.reservation
            self.running.append(r)

    def _pick_row(self, r: Request) -> int:
        """The free row for r: the one whose kept tokens share the longest prefix with r's prompt (r starts
        after that prefix, in place), else an empty row, else the least recently freed. Caller holds the lock."""
        cap = len(r.prompt_ids) - 1
        best, n = None, 0
        for s in self.free_slots:
            k = _common(self.kept.get(s, ()), r.prompt_ids, cap)
            if k > n:
                best, n = s, k
        if best is None:
            empty = [s for s in self.free_slots if s not in self.kept]
            best = empty[0] if empty else min(self.free_slots, key=self.kept_at.__getitem__)
        self._forget(best)
        r.prefilled = r.cached = n
        return best

    def _forget(self, slot: int) -> None:
        """Row ``slot`` is about to be written: it keeps nothing any more."""
        self.kept.pop(slot, None)
        self.kept_at.pop(slot, None)

    def _keep(self, slot: int, r: Request) -> None:
        """Free row ``slot`` holds r's tokens (from slot 0): a prefix the next requests may reuse."""
        if self.prefix_cache:
            self.kept[slot] = self._content(r)
            self.kept_at[slot] = time.monotonic()

    @staticmethod
    def _content(r: Request) -> list[int]:
        """The tokens whose keys and values r's cache row holds, from slot 0."""
        return r.prompt_ids[: r.prefilled] + r.out_ids[: r.fed]

    def _match(self, r: Request, prefilling: list[Request]) -> bool:
        """Before r's first prefill chunk: copy the longest prefix of its prompt that another row holds (running
        or kept) into r's row, and skip what it covers. False (r waits this step) when an older request still
        prefilling will write a longer shared prefix (by ``PREFIX_WAIT_MIN`` tokens or more) soon."""
        cap = len(r.prompt_ids) - 1  # the last prompt token is always computed: its logits give the first token
        with self.lock:
            sources = [(o.slot, self._content(o)) for o in self.running if o is not r and o.finish_reason is None]
            sources += list(self.kept.items())
        src, n = None, r.prefilled
        for slot, ids in sources:
            k = _common(ids, r.prompt_ids, cap)
            if k > n:
                src, n = slot, k
        for o in prefilling:  # sorted by arrival: the older ones come first
            if o is r:
                break
            if _common(o.prompt_ids, r.prompt_ids, cap) >= n + PREFIX_WAIT_MIN:
                return False
        if src is not None:
            self.runner.move_row(src, r.slot, n)
            r.prefilled = r.cached = n
        r.matched = True
        self.prompt_tokens += len(r.prompt_ids)
        self.cached_tokens += r.cached
        self.on_metrics(None, prompt_tokens=len(r.prompt_ids), cached_tokens=r.cached)
        return True

    def _free(self, r: Request) -> None:
        """Give back r's cache row and reservation; the row keeps r's tokens for the prefix cache unless r
        failed (its row may hold a half-written step). Caller holds the lock."""
        if r in self.running:
            self.running.remove(r)
            self.free_slots.append(r.slot)
            self.free_slots.sort()
            self.reserved -= r.reservation
            if r.finish_reason != "error" and (r.prefilled or r.fed):
                self._keep(r.slot, r)

    def _finish(self, r: Request, reason: str) -> None:
        """End r from outside the token path (cancelled, timeout). Caller holds the lock."""
        r.finish_reason = reason
        self._free(r)
        self._send(r, Event(_release(r, final=True), finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                            completion_tokens=len(r.out_ids), cached_tokens=r.cached))

    def _prefill_forward(self, batch: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """One forward over the next ``n`` prompt tokens of each request, right-padded to a common length;
        the logits at each row's last real token.

        Padding writes land in the row's own cache beyond its current length, where the mask hides them until
        the row's real tokens overwrite them."""
        T = max(n for _, n in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        pos = torch.empty(len(batch), T, dtype=torch.long)
        for i, (r, n) in enumerate(batch):
            ids[i, :n] = torch.tensor(r.prompt_ids[r.prefilled : r.prefilled + n])
            pos[i] = torch.arange(r.prefilled, r.prefilled + T).clamp_(max=self.max_len - 1)
        last = torch.tensor([n - 1 for _, n in batch])
        return list(self.runner.prefill(ids, pos, [r.slot for r, _ in batch], logits_at=last))

    def _prefill_commit(self, item: tuple[Request, int], logits: torch.Tensor) -> None:
        r, n = item
        r.prefilled += n
        if r.prefilled == len(r.prompt_ids):
            self._take(r, logits)

    @staticmethod
    def _written(r: Request) -> int:
        """Cache slots of r's row that hold its context (prompt so far and generated tokens): at most this."""
        return r.prefilled + len(r.out_ids)

    def _compact(self, decoding: list[Request]) -> None:
        """Put the decoding requests on cache rows 0..D-1 (a compiled step runs rows 0..B-1): a decoding request
        on a higher row moves to a free row below D, or trades rows with a request still prefilling there. Rows
        move only when requests join or leave; a move copies the row's written slots."""
        D = len(decoding)
        stray = [r for r in decoding if r.slot >= D]
        if not stray:
            return
        ids = {id(r) for r in decoding}
        with self.lock:
            by_slot = {r.slot: r for r in self.running}
            targets = [s for s in range(D) if s not in by_slot or id(by_slot[s]) not in ids]
            for r, s in zip(stray, targets):
                other = by_slot.get(s)
                if other is None:
                    self._forget(s)
                    self.runner.move_row(r.slot, s, self._written(r))
                    self.row_moves += 1
                    self.free_slots.remove(s)
                    self.free_slots.append(r.slot)
                    self.free_slots.sort()
                    self._keep(r.slot, r)  # the row left behind still holds a copy of r's tokens
                else:
                    self.runner.swap_rows(r.slot, s, max(self._written(r), self._written(other)))
                    self.row_swaps += 1
                    other.slot = r.slot
                r.slot = s

    def _decode_forward(self, rs: list[Request]) -> list[tuple[int, torch.Tensor | None]]:
        """One batched decode step and sampling: (token, log-probabilities or None) per request."""
        ids = torch.tensor([r.next_input for r in rs])
        pos = torch.tensor([len(r.prompt_ids) + len(r.out_ids) - 1 for r in rs])
        masks = MaskJob([r.constraint for r in rs])  # computed while the forward runs
        # (each row attends up to its position: the longest row's, which the runner rounds up to its bucket)
        logits = self.runner.decode(ids, pos, [r.slot for r in rs])
        logits = masks.apply(logits)
        toks = sample(logits, [r.params for r in rs], [r.generator for r in rs],
                      [r.prompt_ids + r.out_ids for r in rs] if any(r.params.repetition_penalty != 1 for r in rs) else None)
        lps = torch.log_softmax(logits.float(), -1) if any(r.logprobs is not None for r in rs) else None
        return [(int(toks[i]), None if lps is None else lps[i]) for i in range(len(rs))]

    def _emit_sampled(self, r: Request, res: tuple[int, torch.Tensor | None]) -> None:
        r.fed = len(r.out_ids)  # the step wrote the keys and values of r's last token
        self._emit(r, *res)

    def _take(self, r: Request, logits: torch.Tensor) -> None:
        """Sample the first token from the prefill logits."""
        logits = MaskJob([r.constraint]).apply(logits[None])[0]
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
                   r.finish_reason, len(r.prompt_ids), len(r.out_ids), cached_tokens=r.cached)
        if r.finish_reason:
            with self.lock:
                self._free(r)
        self._send(r, ev)

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



def _common(a, b, cap: int) -> int:
    """Length of the common prefix of token lists a and b, at most ``cap``."""
    n = 0
    for x, y in zip(a, b):
        if n >= cap or x != y:
            break
        n += 1
    return n


def _req(item) -> Request:
    """The request of a step item: a Request (decode) or a (Request, n) pair (prefill)."""
    return item[0] if isinstance(item, tuple) else item
