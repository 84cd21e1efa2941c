"""The FastAPI application: OpenAI routes over the scheduler, Prometheus metrics, API key, OpenAI-style errors.

The scheduler drives the engine as compiled (``_runner``): at O2/O3 its decode steps run the compiled step over
the planned cache (``openautoglm serve`` compiles for ``--max-batch`` rows of ``--max-len``); with ``--opt
auto`` (the default) a server that starts at O1 while O3 builds in the background moves to O3 at the first
moment it is idle after the build is done.

This module imports fastapi at import time; only ``openautoglm serve`` imports it. The scheduler runs on a
thread of its own that the app's lifespan starts, or on the caller's (``app.state.run_scheduler``:
``openautoglm serve`` runs it on the main thread, the thread that loaded the model, and HTTP on another: torch's
OpenMP keeps a thread pool per thread that runs parallel work, and with two pools alive on 2 cores libgomp stops
its workers spinning between parallel regions, which doubled the one-stream decode step); each request gets an
asyncio queue that the scheduler feeds through ``loop.call_soon_threadsafe``. A client that disconnects is cancelled, and its cache row is freed at the
scheduler's next step.

Faults: a request the scheduler fails answers 500 (or ends its stream with ``finish_reason: "error"``); the
HTTP side also enforces each request's deadline, so nothing hangs on a stalled scheduler; ``/health`` answers
503 when the watchdog sees no progress with work pending; a scheduler that gives up after repeated faults calls
``app.state.on_fatal`` (the runner stops the server, and ``openautoglm serve`` exits non-zero). Error bodies
never carry a traceback or the prompt. The outermost middleware checks the API key (constant time), the body
size (declared or streamed), the concurrent requests per key, and writes a Common Log Format access line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthExceededError, InvalidParameterError, OpenAutoGLMError
from ..runtime.sampler import SamplingParams
from ..runtime.scheduler import Event, QueueFullError, Request, Scheduler
from ..toolcall import ChatPlan, ToolStream
from .protocol import IGNORED, UNSUPPORTED, ChatCompletionRequest, CompletionRequest


access_log = logging.getLogger("openautoglm.access")


@dataclass
class ServeSettings:
    max_batch: int = 16
    max_queue: int = 64
    max_len: int | None = 2048  # per-request context (prompt + max_tokens); the KV cache holds max_batch of them
    prefill_chunk: int = 512  # prompt tokens per scheduler step, over all prefilling requests
    kv_budget_mb: float | None = None
    api_keys: tuple[str, ...] = ()  # any of them as 'Authorization: Bearer KEY' on /v1 routes; () = open
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    aging_s: float = 5.0
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None  # None: up to the context
    max_tokens_cap: int | None = None  # largest max_tokens a request may ask for; None: up to the context
    max_streams_per_key: int = 32  # concurrent generation requests per API key (with keys; 0 = no limit)
    watchdog_s: float = 30.0  # no scheduler progress this long with work pending: /health answers 503
    max_failures: int = 3  # failed steps within failure_window_s that make the scheduler give up
    failure_window_s: float = 60.0
    prefix_cache: bool = True  # reuse the keys and values of prompt prefixes shared with earlier requests


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error", param=None,
                 headers: dict | None = None):
        self.status, self.message, self.code, self.type, self.param, self.headers = status, message, code, type_, param, headers


def _error_body(message: str, type_: str, code: str | None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _finite_lp(v: float) -> float:
    return v if math.isfinite(v) else -9999.0


def _short(x, n: int = 64) -> str:
    """A user-supplied name for an error message, bounded (a fuzzed key can be megabytes)."""
    t = str(x)
    return t if len(t) <= n else t[:n] + "..."


class _Guard:
    """Outermost ASGI middleware: API key, per-key concurrency and body size on /v1, and an access log line
    (Common Log Format, the key's index as the user, never the key) for every request."""

    def __init__(self, app, st: ServeSettings, metrics):
        self.app, self.st, self.metrics = app, st, metrics
        self.keys = [f"Bearer {k}".encode() for k in st.api_keys]
        self.inflight: dict[str, int] = {}

    def _key(self, auth: bytes) -> int | None:
        found = None
        for i, k in enumerate(self.keys):  # every key compared, each in constant time
            if hmac.compare_digest(auth, k):
                found = i
        return found

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path, user = self.st, scope.get("path", ""), "-"
        status, size = [500], [0]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            elif msg["type"] == "http.response.body":
                size[0] += len(msg.get("body", b""))
            await send(msg)

        async def reject(code: int, message: str, err: str, headers: dict | None = None):
            self.metrics.requests.labels(status=str(code)).inc()
            await JSONResponse(_error_body(message, "invalid_request_error", err), status_code=code,
                               headers=headers)(scope, receive, send_)

        counted = None
        try:
            if path.startswith("/v1"):
                headers = dict(scope.get("headers") or ())
                if self.keys:
                    k = self._key(headers.get(b"authorization", b""))
                    if k is None:
                        return await reject(401, "invalid or missing API key (Authorization: Bearer ...)",
                                            "invalid_api_key")
                    user = f"key{k}"
                try:
                    declared = int(headers.get(b"content-length") or 0)
                except ValueError:
                    declared = 0
                if declared > st.max_body_bytes:
                    return await reject(413, f"request body of {declared} bytes is over {st.max_body_bytes}",
                                        "request_too_large")
                if self.keys and st.max_streams_per_key and scope.get("method") == "POST":
                    if self.inflight.get(user, 0) >= st.max_streams_per_key:
                        return await reject(429, f"too many concurrent requests for this API key (at most "
                                            f"{st.max_streams_per_key})", "rate_limit_exceeded", {"Retry-After": "1"})
                    counted = user
                    self.inflight[user] = self.inflight.get(user, 0) + 1
                receive = self._limited(receive, st.max_body_bytes)
            await self.app(scope, receive, send_)
        finally:
            if counted is not None:
                self.inflight[counted] -= 1
            q = scope.get("query_string") or b""
            target = path + ("?" + q.decode("latin-1") if q else "")
            client = (scope.get("client") or ("-",))[0]
            access_log.info('%s - %s [%s] "%s %s HTTP/%s" %d %s', client, user, time.strftime("%d/%b/%Y:%H:%M:%S %z"),
                            scope.get("method", "-"), target, scope.get("http_version", "1.1"), status[0],
                            size[0] or "-")

    @staticmethod
    def _limited(receive, limit: int):
        """``receive`` that refuses a body growing past ``limit`` bytes (a chunked body declares no length)."""
        seen = 0

        async def recv():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body is over {limit} bytes")
            return msg

        return recv


class Metrics:
    """Prometheus metrics on a registry of this app's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("openautoglm_requests_total", "Finished requests by status", ["status"], registry=r)
        self.queue = Gauge("openautoglm_queue_depth", "Requests waiting", registry=r)
        self.running = Gauge("openautoglm_running_batch_size", "Requests in the running batch", registry=r)
        self.kv = Gauge("openautoglm_kv_cache_bytes_in_use", "KV cache bytes holding live tokens", registry=r)
        self.kv_reserved = Gauge("openautoglm_kv_cache_bytes_reserved", "KV cache bytes reserved by admitted requests",
                                 registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("openautoglm_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.itl = Histogram("openautoglm_inter_token_latency_seconds", "Time between tokens", buckets=buckets, registry=r)
        self.tokens = Counter("openautoglm_generated_tokens_total", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("openautoglm_prompt_tokens_total", "Prompt tokens of admitted requests",
                                     registry=r)
        self.cached_tokens = Counter("openautoglm_prefix_cache_hit_tokens_total",
                                     "Prompt tokens whose keys and values came from the prefix cache", registry=r)

    def __call__(self, stats=None, ttft=None, token=False, itl=None, prompt_tokens=0, cached_tokens=0):
        if stats is not None:
            self.queue.set(stats["queue_depth"])
            self.running.set(stats["running"])
            self.kv.set(stats["kv_bytes_in_use"])
            self.kv_reserved.set(stats["kv_bytes_reserved"])
        if ttft is not None:
            self.ttft.observe(ttft)
        if token:
            self.tokens.inc()
        if itl is not None:
            self.itl.observe(itl)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
            self.cached_tokens.inc(cached_tokens)


def _switch_when_built(engine):
    """The scheduler's idle hook: once a background O3 build (``--opt auto``) is done, serve on it."""
    def hook(sched: Scheduler) -> None:
        if getattr(engine, "_build", None) is None:
            return
        before = getattr(engine, "compiled", None)
        engine._switch_if_built()
        if engine.compiled is not before:
            sched.rebind(engine.model_runner(compile_missing=False))
            logging.getLogger("openautoglm.serve").warning("now serving at %s", engine.compiled.level)
    return hook


class _either:
    """A stop flag that is set when either of two events is (what ``Scheduler.run`` polls)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.a.is_set() or self.b.is_set()


def create_app(engine, settings: ServeSettings | None = None):
    st = settings or ServeSettings()
    metrics = Metrics()
    budget = None
    sched = Scheduler(engine.model_runner(compile_missing=False), engine.tokenizer, engine.eos_ids,
                      max_batch=st.max_batch, max_queue=st.max_queue, max_len=st.max_len,
                      prefill_chunk=st.prefill_chunk, aging_s=st.aging_s, on_metrics=metrics,
                      max_failures=st.max_failures, failure_window_s=st.failure_window_s,
                      on_idle=_switch_when_built(engine), prefix_cache=st.prefix_cache)
    if st.kv_budget_mb:
        budget = int(st.kv_budget_mb * 2**20 // sched.bytes_per_token)
        sched.kv_budget_tokens = budget
    model_id = engine.model_path.name if hasattr(engine.model_path, "name") else str(engine.model_path)
    stop_flag = threading.Event()
    thread: list[threading.Thread] = []

    def run_scheduler(stop: threading.Event | None = None):
        """Step until the app shuts down (or ``stop`` is set); on the caller's thread when it is not the
        lifespan's own."""
        if threading.current_thread() is not (thread[0] if thread else None):
            thread.append(threading.current_thread())
            app.state.own_thread = False
        halt = stop_flag if stop is None else _either(stop_flag, stop)
        sched.run(halt)
        if sched.fatal is not None:
            app.state.fatal = sched.fatal
            if app.state.on_fatal is not None:
                app.state.on_fatal()

    def scheduler_down() -> str | None:
        """Why the scheduler cannot serve now, or None."""
        if sched.fatal is not None:
            return f"the scheduler stopped after repeated faults: {sched.fatal}"
        if thread and not thread[0].is_alive() and not stop_flag.is_set():
            return "the scheduler thread is not running"
        return None

    @asynccontextmanager
    async def lifespan(app):
        th = None
        if app.state.own_thread:
            th = threading.Thread(target=run_scheduler, name="openautoglm-scheduler", daemon=True)
            thread.append(th)
            th.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, sched.shutdown, st.drain_timeout)
        deadline = time.monotonic() + 5
        while not sched.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop_flag.set()
        if th is not None:
            th.join(timeout=5)

    app = FastAPI(title="openautoglm", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.model_id = sched, metrics, model_id
    app.state.fatal, app.state.on_fatal = None, None  # on_fatal: set by whoever runs the server (stop it)
    # the lifespan starts the scheduler's thread unless the caller runs app.state.run_scheduler itself
    app.state.own_thread, app.state.run_scheduler = True, run_scheduler
    app.add_middleware(_Guard, st=st, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.requests.labels(status=str(exc.status)).inc()
        return JSONResponse(_error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            return await _api_error(request, APIError(400, "the request body is not valid JSON", "invalid_json"))
        loc = _short(loc, 120)
        msg = f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "invalid request")
        return await _api_error(request, APIError(400, msg, "invalid_value", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code,
                                                                                          "http_error")
        return await _api_error(request, APIError(exc.status_code, str(exc.detail), code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # a bug of ours: the traceback goes to the server log, not the client
        metrics.requests.labels(status="500").inc()
        return JSONResponse(_error_body("internal server error", "server_error", "internal_error"), status_code=500)

    def check_model(name: str):
        if name not in (model_id, "default", str(engine.model_path)):
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_id!r} (or 'default')",
                           "model_not_found", param="model")

    def check_unsupported(body):
        extra = body.model_extra or {}
        for k, v in {**extra, "n": body.n}.items():
            if k in IGNORED:
                continue
            if k not in UNSUPPORTED:
                raise APIError(400, f"unsupported parameter {_short(k)!r}", "unsupported_parameter", param=_short(k))
            if v != UNSUPPORTED[k] and v is not None:
                raise APIError(400, f"parameter {k!r} is not supported (only its default, {UNSUPPORTED[k]!r})",
                               "unsupported_parameter", param=k)

    max_prompt = min(st.max_prompt_tokens or sched.max_len, sched.max_len)

    def sampling(body, max_tokens, n_prompt: int, param: str, grammar=None) -> SamplingParams:
        """Sampling parameters for a prompt of ``n_prompt`` tokens; no max_tokens means up to the context (and
        the server's cap), as OpenAI does (a prompt that leaves no room fails at submit with
        context_length_exceeded)."""
        if n_prompt > max_prompt:
            raise APIError(400, f"the prompt has {n_prompt} tokens; this server accepts at most {max_prompt}",
                           "context_length_exceeded", param=param)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, "max_tokens must be at least 1", "invalid_value", param="max_tokens")
        if max_tokens is not None and st.max_tokens_cap and max_tokens > st.max_tokens_cap:
            raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {st.max_tokens_cap}",
                           "invalid_value", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(sched.max_len - n_prompt, st.max_tokens_cap or sched.max_len))
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                  repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop or (),
                                  ignore_eos=body.ignore_eos, grammar=grammar)
        except InvalidParameterError as e:
            raise APIError(400, str(e), "invalid_value") from None

    def submit(prompt_ids, params, body, logprobs=None):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        req = Request(prompt_ids, params, sink=lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev),
                      priority=body.priority, timeout_s=body.timeout or st.request_timeout, logprobs=logprobs)
        try:
            sched.submit(req)
        except QueueFullError as e:
            raise APIError(429, str(e), e.code, "rate_limit_error", headers={"Retry-After": "1"}) from None
        except ContextLengthExceededError as e:
            raise APIError(400, str(e), "context_length_exceeded", param="messages") from None
        except OpenAutoGLMError as e:
            raise APIError(e.http_status, str(e), e.code) from None
        return req, q

    async def events(http: HTTPRequest, req: Request, q: asyncio.Queue):
        """The request's events until it finishes. If the client goes away (noticed here, or the response is
        cancelled under us), the request is cancelled and its cache row freed at the next step. The deadline
        and a dead scheduler are checked here too, so a stalled step cannot hang the request."""
        finished = False
        deadline = req.arrival + req.timeout_s + 1.0
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    down = scheduler_down()
                    if down is None and time.monotonic() < deadline:
                        continue
                    sched.cancel(req)
                    ev = Event("", finish_reason="error" if down else "timeout", prompt_tokens=len(req.prompt_ids),
                               error=down and "the server cannot generate now; retry later")
                if ev.finish_reason is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                sched.cancel(req)
                metrics.requests.labels(status="cancelled").inc()

    def encode_messages(body: ChatCompletionRequest):
        """The prompt ids and, for a request with tools or a response_format, its ChatPlan (else None)."""
        msgs = []
        for i, m in enumerate(body.messages):
            c = m.content
            if isinstance(c, list):  # content parts: text only; any other part is refused, naming it
                texts = []
                for j, part in enumerate(c):
                    where = f"messages[{i}].content[{j}]"
                    if part.get("type") != "text":
                        raise APIError(400, f"{where}: content parts of type {_short(part.get('type'))!r} are not "
                                       "supported (this model takes text parts only)", "unsupported_content",
                                       param=where)
                    if not isinstance(part.get("text"), str):
                        raise APIError(400, f"{where}.text must be a string", "invalid_value", param=where)
                    texts.append(part["text"])
                c = "".join(texts)
            msg = {"role": m.role, "content": c or ""}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            msgs.append(msg)
        if body.tools is None and body.tool_choice is None and body.response_format is None:
            try:
                return engine.tokenizer.encode_chat(msgs), None
            except OpenAutoGLMError as e:
                raise APIError(400, str(e), "invalid_value", param="messages") from None
        try:
            plan = ChatPlan(engine.tokenizer, msgs, body.tools, body.tool_choice, body.parallel_tool_calls,
                            body.response_format)
        except OpenAutoGLMError as e:
            raise APIError(400, str(e), "invalid_value", param=getattr(e, "param", None) or "messages") from None
        return plan.prompt_ids, plan

    def lp_entry(tok_id, lp, top):
        """One token's logprobs entry. A token the grammar rules out has logprob -inf, which JSON cannot carry:
        it is -9999.0, as in OpenAI's and vLLM's answers."""
        tok = engine.tokenizer.decode([tok_id], skip_special_tokens=False)
        ent = {"token": tok, "logprob": _finite_lp(lp), "bytes": list(tok.encode("utf-8"))}
        ent["top_logprobs"] = [
            {"token": (t := engine.tokenizer.decode([i], skip_special_tokens=False)), "logprob": _finite_lp(v),
             "bytes": list(t.encode("utf-8"))} for i, v in (top or [])]
        return ent

    def sse_response(evs, base: dict, obj: str, choice, head: dict | None = None):
        """Server-sent events: ``head`` first, then a chunk per event that ``choice`` turns into a choice; the
        last chunk carries ``usage``; then ``[DONE]``."""
        async def gen():
            if head is not None:
                yield _sse(head)
            async for ev in evs:
                ch = choice(ev)
                if ch is None:
                    continue
                chunk = {**base, "object": obj, "choices": [ch]}
                if ev.finish_reason:
                    chunk["usage"] = usage(ev)
                    metrics.requests.labels(status=status_of(ev.finish_reason)).inc()
                yield _sse(chunk)
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}

    def finish(reason):
        return reason if reason in ("stop", "length", "error") else "stop"

    def status_of(reason):
        return {"stop": "200", "length": "200", "error": "500"}.get(reason, reason)

    def failed(ev: Event) -> APIError:
        """The HTTP error for a request that ended without output (timeout, error)."""
        if ev.finish_reason == "timeout":
            return APIError(408, "the request timed out", "timeout")
        return APIError(500, ev.error or "internal server error", "internal_error", "server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        check_unsupported(body)
        ids, plan = encode_messages(body)
        mt = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(body, mt, len(ids), "messages", plan.grammar if plan else None)
        tooling = plan is not None and plan.calls_tools
        k = (body.top_logprobs or 0) if body.logprobs else None
        req, q = submit(ids, params, body, logprobs=k)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "created": created, "model": model_id}

        if body.stream:
            ts = ToolStream(plan) if tooling else None

            def choice(ev):
                lp = {"content": [lp_entry(ev.token_id, ev.logprob, ev.top_logprobs)]} \
                    if k is not None and ev.token_id is not None else None
                if ts is None:
                    deltas = [{"content": ev.text}] if ev.text else []
                else:  # tool calls leave the content stream and come as tool_calls deltas
                    deltas = ts.feed(ev.text) + (ts.finish() if ev.finish_reason else [])
                if not (deltas or lp or ev.finish_reason):
                    return None
                reason = None
                if ev.finish_reason:
                    reason = "tool_calls" if ts is not None and ts.calls else finish(ev.finish_reason)
                delta = {}
                for d in deltas:  # one event's deltas merged: content joined, tool calls listed
                    if "content" in d:
                        delta["content"] = delta.get("content", "") + d["content"]
                    else:
                        delta.setdefault("tool_calls", []).extend(d["tool_calls"])
                return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}

            head = {**base, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            return sse_response(events(http, req, q), base, "chat.completion.chunk", choice, head)

        text, lps, last = "", [], None
        async for ev in events(http, req, q):
            text += ev.text
            if k is not None and ev.token_id is not None:
                lps.append(lp_entry(ev.token_id, ev.logprob, ev.top_logprobs))
            last = ev
        if last is None or last.finish_reason not in ("stop", "length"):
            if last is None or last.finish_reason == "cancelled":
                return Response(status_code=499)
            raise failed(last)
        metrics.requests.labels(status="200").inc()
        message = plan.message(text) if plan is not None else {"role": "assistant", "content": text}
        reason = "tool_calls" if message.get("tool_calls") else last.finish_reason
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": message,
                             "logprobs": {"content": lps} if k is not None else None,
                             "finish_reason": reason}],
                "usage": usage(last)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        check_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings", "invalid_value", param="prompt")
        encoded = [engine.tokenizer.encode(p) for p in prompts]
        params = [sampling(body, body.max_tokens, len(ids), "prompt") for ids in encoded]  # all validated before any submit
        subs = [submit(ids, pp, body) for ids, pp in zip(encoded, params)]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "created": created, "model": model_id}

        if body.stream:
            if len(subs) > 1:
                for r, _ in subs:
                    sched.cancel(r)
                raise APIError(400, "streaming takes a single prompt", "unsupported_parameter", param="prompt")
            req, q = subs[0]

            def choice(ev):
                if not (ev.text or ev.finish_reason):
                    return None
                return {"index": 0, "text": ev.text, "logprobs": None,
                        "finish_reason": finish(ev.finish_reason) if ev.finish_reason else None}

            return sse_response(events(http, req, q), base, "text_completion", choice)

        async def collect(req, q):
            text, last = "", None
            async for ev in events(http, req, q):
                text += ev.text
                last = ev
            return text, last

        outs = await asyncio.gather(*(collect(r, q) for r, q in subs))
        bad = [last for _, last in outs if last is None or last.finish_reason not in ("stop", "length")]
        if bad:
            for r, _ in subs:  # one prompt failed: the others are not worth finishing
                sched.cancel(r)
            ended = [b for b in bad if b is not None and b.finish_reason in ("timeout", "error")]
            if not ended:
                return Response(status_code=499)
            raise failed(ended[0])
        metrics.requests.labels(status="200").inc()
        tot = {"prompt_tokens": sum(l.prompt_tokens for _, l in outs),
               "completion_tokens": sum(l.completion_tokens for _, l in outs)}
        tot["total_tokens"] = tot["prompt_tokens"] + tot["completion_tokens"]
        tot["prompt_tokens_details"] = {"cached_tokens": sum(l.cached_tokens for _, l in outs)}
        return {**base, "object": "text_completion",
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": l.finish_reason}
                            for i, (t, l) in enumerate(outs)],
                "usage": tot}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "openautoglm"}]}

    @app.get("/health")
    async def health():
        s = sched.stats()
        reason = scheduler_down() or sched.stalled(st.watchdog_s)
        if reason:
            return JSONResponse({"status": "unhealthy", "reason": reason, "model": model_id, **s}, status_code=503)
        return {"status": "ok" if sched.accepting else "draining", "model": model_id, **s}

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics(sched.stats())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
