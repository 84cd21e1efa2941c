"""The FastAPI application: OpenAI routes over the scheduler, Prometheus metrics, API key, OpenAI-style errors.

This module imports fastapi at import time; only ``openautoglm serve`` imports it. The scheduler runs on its
own thread; each request gets an asyncio queue that the scheduler feeds through
``loop.call_soon_threadsafe``. A client that disconnects is cancelled, and its cache row is freed at the
scheduler's next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ContextLengthExceededError, InvalidParameterError, OpenAutoGLMError
from ..runtime.sampler import SamplingParams
from ..runtime.scheduler import Event, QueueFullError, Request, Scheduler
from .protocol import IGNORED, UNSUPPORTED, ChatCompletionRequest, CompletionRequest


@dataclass
class ServeSettings:
    max_batch: int = 16
    max_queue: int = 64
    max_len: int | None = 2048  # per-request context (prompt + max_tokens); the KV cache holds max_batch of them
    prefill_chunk: int = 512  # prompt tokens per scheduler step, over all prefilling requests
    kv_budget_mb: float | None = None
    api_key: str | None = None
    request_timeout: float = 600.0
    drain_timeout: float = 30.0
    aging_s: float = 5.0
    max_body_bytes: int = 4 << 20


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error", param=None,
                 headers: dict | None = None):
        self.status, self.message, self.code, self.type, self.param, self.headers = status, message, code, type_, param, headers


def _error_body(message: str, type_: str, code: str | None, param=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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

    def __call__(self, stats=None, ttft=None, token=False, itl=None):
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


def create_app(engine, settings: ServeSettings | None = None):
    st = settings or ServeSettings()
    metrics = Metrics()
    budget = None
    sched = Scheduler(engine.model, engine.tokenizer, engine.eos_ids, max_batch=st.max_batch, max_queue=st.max_queue,
                      max_len=st.max_len, prefill_chunk=st.prefill_chunk, aging_s=st.aging_s, on_metrics=metrics)
    if st.kv_budget_mb:
        budget = int(st.kv_budget_mb * 2**20 // sched.bytes_per_token)
        sched.kv_budget_tokens = budget
    model_id = engine.model_path.name if hasattr(engine.model_path, "name") else str(engine.model_path)
    stop_flag = threading.Event()

    @asynccontextmanager
    async def lifespan(app):
        th = threading.Thread(target=sched.run, args=(stop_flag,), name="openautoglm-scheduler", daemon=True)
        th.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, sched.shutdown, st.drain_timeout)
        deadline = time.monotonic() + 5
        while not sched.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop_flag.set()
        th.join(timeout=5)

    app = FastAPI(title="openautoglm", lifespan=lifespan)
    app.state.scheduler, app.state.metrics, app.state.model_id = sched, metrics, model_id

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
        msg = f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "invalid request")
        return await _api_error(request, APIError(422, msg, "invalid_value", param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return await _api_error(request, APIError(exc.status_code, str(exc.detail), code))

    @app.middleware("http")
    async def _guard(request: HTTPRequest, call_next):
        if request.url.path.startswith("/v1"):
            if st.api_key:
                auth = request.headers.get("authorization", "")
                if auth != f"Bearer {st.api_key}":
                    metrics.requests.labels(status="401").inc()
                    return JSONResponse(_error_body("invalid or missing API key (Authorization: Bearer ...)",
                                                    "invalid_request_error", "invalid_api_key"), status_code=401)
            size = int(request.headers.get("content-length") or 0)
            if size > st.max_body_bytes:
                metrics.requests.labels(status="413").inc()
                return JSONResponse(_error_body(f"request body of {size} bytes is over {st.max_body_bytes}",
                                                "invalid_request_error", "request_too_large"), status_code=413)
        return await call_next(request)

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
                raise APIError(400, f"unsupported parameter {k!r}", "unsupported_parameter", param=k)
            if v != UNSUPPORTED[k] and v is not None:
                raise APIError(400, f"parameter {k!r}={v!r} is not supported", "unsupported_parameter", param=k)

    def sampling(body, max_tokens, n_prompt: int) -> SamplingParams:
        """Sampling parameters for a prompt of ``n_prompt`` tokens; no max_tokens means up to the context,
        as OpenAI does (a prompt that leaves no room fails at submit with context_length_exceeded)."""
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, "max_tokens must be at least 1", "invalid_value", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, sched.max_len - n_prompt)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                                  repetition_penalty=body.repetition_penalty, seed=body.seed, stop=body.stop or (),
                                  ignore_eos=body.ignore_eos)
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
        cancelled under us), the request is cancelled and its cache row freed at the next step."""
        finished = False
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if ev.finish_reason is not None:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                sched.cancel(req)
                metrics.requests.labels(status="cancelled").inc()

    def encode_messages(body: ChatCompletionRequest) -> list[int]:
        msgs = []
        for m in body.messages:
            c = m.content
            if isinstance(c, list):  # content parts: keep the text ones
                c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
            msgs.append({"role": m.role, "content": c or ""})
        try:
            return engine.tokenizer.encode_chat(msgs)
        except OpenAutoGLMError as e:
            raise APIError(400, str(e), "invalid_value", param="messages") from None

    def lp_entry(tok_id, lp, top):
        tok = engine.tokenizer.decode([tok_id], skip_special_tokens=False)
        ent = {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
        ent["top_logprobs"] = [
            {"token": (t := engine.tokenizer.decode([i], skip_special_tokens=False)), "logprob": v,
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
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    def finish(reason):
        return reason if reason in ("stop", "length") else "stop"

    def status_of(reason):
        return {"stop": "200", "length": "200"}.get(reason, reason)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        check_model(body.model)
        check_unsupported(body)
        ids = encode_messages(body)
        params = sampling(body, body.max_completion_tokens or body.max_tokens, len(ids))
        k = (body.top_logprobs or 0) if body.logprobs else None
        req, q = submit(ids, params, body, logprobs=k)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": cid, "created": created, "model": model_id}

        if body.stream:
            def choice(ev):
                lp = {"content": [lp_entry(ev.token_id, ev.logprob, ev.top_logprobs)]} \
                    if k is not None and ev.token_id is not None else None
                if not (ev.text or lp or ev.finish_reason):
                    return None
                return {"index": 0, "delta": {"content": ev.text} if ev.text else {}, "logprobs": lp,
                        "finish_reason": finish(ev.finish_reason) if ev.finish_reason else None}

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
            reason = last.finish_reason if last else "cancelled"
            if last is not None:
                metrics.requests.labels(status=status_of(reason)).inc()
            if reason == "timeout":
                raise APIError(408, "the request timed out", "timeout")
            return Response(status_code=499)
        metrics.requests.labels(status="200").inc()
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": lps} if k is not None else None,
                             "finish_reason": last.finish_reason}],
                "usage": usage(last)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body.model)
        check_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not isinstance(p, str) or not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of strings", "invalid_value", param="prompt")
        encoded = [engine.tokenizer.encode(p) for p in prompts]
        params = [sampling(body, body.max_tokens, len(ids)) for ids in encoded]  # all validated before any submit
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
        if any(last is None or last.finish_reason not in ("stop", "length") for _, last in outs):
            if any(last is not None and last.finish_reason == "timeout" for _, last in outs):
                metrics.requests.labels(status="timeout").inc()
                raise APIError(408, "the request timed out", "timeout")
            return Response(status_code=499)
        metrics.requests.labels(status="200").inc()
        tot = {"prompt_tokens": sum(l.prompt_tokens for _, l in outs),
               "completion_tokens": sum(l.completion_tokens for _, l in outs)}
        tot["total_tokens"] = tot["prompt_tokens"] + tot["completion_tokens"]
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
        return {"status": "ok" if sched.accepting else "draining", "model": model_id, **s}

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics(sched.stats())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
