"""Property-based fuzzing of every endpoint's request body (hypothesis): 2,000 bodies per run, from valid
requests with fields swapped for any JSON value, to arbitrary JSON and raw bytes. Every case must answer
within a time bound with a non-5xx status and, for an error, one OpenAI-style JSON error without a traceback;
the server stays healthy after every case and still gives the reference greedy answer every 250 cases and
at the end. Cases are derandomized (the same 2,000 each run, so CI is stable); OAG_FUZZ_RANDOM=1 explores new
ones."""

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_util import Server

pytestmark = pytest.mark.fuzz

CASE_TIMEOUT_S = 20.0
SETTINGS = dict(deadline=None, database=None, derandomize=not os.environ.get("OAG_FUZZ_RANDOM"),
                suppress_health_check=list(HealthCheck))
REF_BODY = {"model": "default", "prompt": "The sea is", "max_tokens": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_engine):
    with Server(tiny_engine, max_batch=4, max_queue=16, max_len=128, max_tokens_cap=4, max_body_bytes=64 << 10) as s:
        s.http = httpx.Client(base_url=s.url, timeout=CASE_TIMEOUT_S)
        s.reference = s.http.post("/v1/completions", json=REF_BODY).json()["choices"][0]["text"]
        s.cases = 0
        yield s
        s.http.close()


scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**100), 2**100), st.integers(-3, 3),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
any_json = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                        max_leaves=8)


part = st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url", "input_audio"])},
                             optional={"text": st.text(max_size=20), "image_url": any_json})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
                                 "content": st.text(max_size=40) | st.lists(part, max_size=3) | st.none()})
# valid values of each field (edge values included); a mutation then swaps a field for any JSON
COMMON = {
    "model": st.sampled_from(["default", "gpt-4", ""]),
    "max_tokens": st.integers(-2, 6),
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-300, 1e-40, 1e300]),
    "top_p": st.floats(0, 1.5),
    "top_k": st.integers(-1, 100000),
    "min_p": st.floats(-0.5, 1.5),
    "repetition_penalty": st.floats(-1, 3) | st.sampled_from([1e-300, 1e300]),
    "seed": st.integers(-(2**70), 2**70),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20),
    "stream": st.booleans(),
    "stream_options": st.none() | st.just({"include_usage": True}),
    "n": st.integers(0, 3),
    "priority": st.integers(-5, 5),
    "timeout": st.floats(0, 30),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=10),
}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
chat_fields = {**COMMON, "max_completion_tokens": st.integers(-2, 6), "logprobs": st.booleans(),
               "top_logprobs": st.integers(-1, 25),
               "tools": st.just([TOOL]) | st.lists(any_json, max_size=2),
               "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {
                   "name": "f"}}]) | any_json,
               "parallel_tool_calls": st.booleans(),
               "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {
                   "type": "json_schema", "json_schema": {"name": "s", "schema": TOOL["function"]["parameters"]}}])
               | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
                   {"name": st.just("s"), "schema": any_json})})}
completion_fields = {**COMMON, "echo": st.booleans()}
valid_chat = st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}, optional=chat_fields)
valid_completion = st.fixed_dictionaries(
    {"prompt": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3)}, optional=completion_fields)


def mutated(valid, fields):
    """A valid body with one or two fields (known or not) swapped for any JSON value, or dropped."""
    key = st.sampled_from(sorted(fields) + ["messages", "prompt", "logit_bias", "tools", "response_format"]) | \
        st.text(max_size=12)
    change = st.tuples(key, any_json | st.just(...))

    def apply(b, changes):
        b = dict(b)
        for k, v in changes:
            if v is ...:
                b.pop(k, None)
            else:
                b[k] = v
        return b

    return st.builds(apply, valid, st.lists(change, min_size=1, max_size=2))


def with_junk(valid, fields):
    """Valid bodies, mutated ones, arbitrary JSON, raw bytes and truncated JSON."""
    bodies = st.one_of(valid, mutated(valid, fields), mutated(valid, fields))
    as_json = bodies.map(json.dumps)
    return st.one_of(as_json, as_json, as_json, any_json.map(json.dumps), st.binary(max_size=300),
                     as_json.map(lambda t: t[: max(1, len(t) // 2)]))


def check(server, method: str, path: str, data=None, ctype="application/json"):
    r = server.http.request(method, path, content=data, headers={"content-type": ctype})
    assert r.status_code < 500, (path, data, r.status_code, r.text[:500])
    assert "Traceback" not in r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"] and "code" in err, r.text
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
    elif r.headers.get("content-type", "").startswith("application/json"):
        r.json()
    server.cases += 1
    h = server.http.get("/health")
    assert h.status_code == 200, h.text
    if server.cases % 250 == 0:
        assert server.http.post("/v1/completions", json=REF_BODY).json()["choices"][0]["text"] == server.reference


@settings(max_examples=900, **SETTINGS)
@given(data=with_junk(valid_chat, chat_fields))
def test_fuzz_chat_completions(server, data):
    check(server, "POST", "/v1/chat/completions", data)


@settings(max_examples=800, **SETTINGS)
@given(data=with_junk(valid_completion, completion_fields))
def test_fuzz_completions(server, data):
    check(server, "POST", "/v1/completions", data)


@settings(max_examples=300, **SETTINGS)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/chat/completions", "/v1/completions",
                             "/v1/embeddings", "/", "/v1/models/x"]) | st.text("/abcv1%.?=&", max_size=20).map(
           lambda p: "/" + p.lstrip("/")),
       data=st.none() | st.binary(max_size=100) | any_json.map(json.dumps),
       ctype=st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x", ""]))
def test_fuzz_other_routes_and_methods(server, method, path, data, ctype):
    check(server, method, path, data, ctype)


def test_fuzz_left_the_server_correct(server):
    assert server.cases >= 2000 or server.cases == 0  # 0: run alone (-k); the three fuzz tests add up to 2000
    assert server.http.post("/v1/completions", json=REF_BODY).json()["choices"][0]["text"] == server.reference
    assert server.app.state.scheduler.faults == 0 and server.app.state.scheduler.idle
