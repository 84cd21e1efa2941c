"""The real server, driven by the official openai client (and raw HTTP for malformed input)."""

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch

from server_util import Server

MSGS = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_engine):
    with Server(tiny_engine, max_batch=8, max_queue=32, max_len=1024) as s:
        yield s


def engine_reference(engine, messages, **kw):
    return engine.generate(messages, **kw)[0]


def test_models_and_health(server):
    c = server.client()
    ids = [m.id for m in c.models.list().data]
    assert ids == [server.app.state.model_id]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0


def test_chat_matches_engine_and_reports_usage(server, tiny_engine):
    c = server.client()
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=12, temperature=0)
    ref = engine_reference(tiny_engine, MSGS, max_tokens=12)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(tiny_engine.tokenizer.encode_chat(MSGS)) == ref.prompt_tokens
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(server):
    c = server.client()
    kw = dict(model="default", messages=MSGS, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == "length" and last.usage.completion_tokens == 20


def test_completions_stream_and_not(server, tiny_engine):
    c = server.client()
    r = c.completions.create(model="default", prompt="Once upon a time", max_tokens=10, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == tiny_engine.infer("Once upon a time", max_tokens=10, ignore_eos=True)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 10)
    s = c.completions.create(model="default", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True,
                             extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_stop_strings_and_finish_reason(server):
    c = server.client()
    kw = dict(model="default", prompt="The quick brown fox", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = c.completions.create(**kw).choices[0].text
    stop = full[6:10]
    r = c.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.find(stop)]


def test_seeded_sampling_is_reproducible(server):
    c = server.client()
    kw = dict(model="default", messages=MSGS, max_tokens=16, temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True})
    a = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    others = {c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in range(3)}
    assert a == b and len(others) > 1


def test_logprobs_match_the_model(server, tiny_engine):
    c = server.client()
    r = c.chat.completions.create(model="default", messages=MSGS, max_tokens=3, temperature=0, logprobs=True,
                                  top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in content)  # greedy picks the top
    ids = tiny_engine.tokenizer.encode_chat(MSGS)
    with torch.no_grad():
        lp = torch.log_softmax(tiny_engine.model(torch.tensor([ids]))[0, -1], -1)
    assert abs(content[0].logprob - float(lp.max())) < 1e-4


def test_concurrent_greedy_requests_equal_sequential(server):
    c = server.client()
    prompts = [f"Request number {i}: " + "tell me more " * i for i in range(8)]
    lens = [5 + 3 * i for i in range(8)]

    def one(i):
        return c.completions.create(model="default", prompt=prompts[i], max_tokens=lens[i], temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text

    alone = [one(i) for i in range(8)]
    out = [None] * 8
    ths = [threading.Thread(target=lambda i=i: out.__setitem__(i, one(i))) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert out == alone


def _metric(server, name, labels=""):
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def _wait(cond, timeout=30):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


class LongStream:
    """A long streaming request held open (client, response and line iterator all kept alive: dropping the
    iterator closes the stream, which the server rightly takes as a disconnect)."""

    def __init__(self, server, wait_first=True, headers=None):
        self.cl = httpx.Client(timeout=60)
        body = {"model": "default", "prompt": "Keep going", "max_tokens": 900, "stream": True, "ignore_eos": True}
        self.resp = self.cl.send(self.cl.build_request("POST", server.url + "/v1/completions", json=body,
                                                       headers=headers), stream=True)
        self.lines = self.resp.iter_lines()
        if wait_first:
            next(l for l in self.lines if l.startswith("data:"))

    def close(self):
        self.resp.close()
        self.cl.close()


def test_disconnect_frees_its_slot(server):
    cancelled0 = _metric(server, "openautoglm_requests_total", '{status="cancelled"}')
    a = LongStream(server)
    _wait(lambda: _metric(server, "openautoglm_running_batch_size") == 1)
    a.close()
    _wait(lambda: _metric(server, "openautoglm_running_batch_size") == 0)
    _wait(lambda: _metric(server, "openautoglm_requests_total", '{status="cancelled"}') == cancelled0 + 1)
    assert _metric(server, "openautoglm_kv_cache_bytes_in_use") == 0
    assert _metric(server, "openautoglm_generated_tokens_total") > 0


def test_full_queue_answers_429(tiny_engine):
    with Server(tiny_engine, max_batch=1, max_queue=1, max_len=1024) as s:
        a = LongStream(s)
        b = LongStream(s, wait_first=False)  # waits in the queue
        _wait(lambda: _metric(s, "openautoglm_queue_depth") == 1)
        with pytest.raises(openai.RateLimitError) as e:
            s.client().completions.create(model="default", prompt="hi", max_tokens=2)
        assert e.value.response.headers.get("retry-after") == "1"
        a.close()
        b.close()


def test_priority_order_is_observable(tiny_engine):
    with Server(tiny_engine, max_batch=1, max_queue=8, max_len=1024, aging_s=1000.0) as s:
        a = LongStream(s)
        done = {}

        def req(name, prio):
            s.client().completions.create(model="default", prompt="hi", max_tokens=4, extra_body={"priority": prio})
            done[name] = time.monotonic()

        low = threading.Thread(target=req, args=("low", 0))
        low.start()
        _wait(lambda: _metric(s, "openautoglm_queue_depth") == 1)
        high = threading.Thread(target=req, args=("high", 10))
        high.start()
        _wait(lambda: _metric(s, "openautoglm_queue_depth") == 2)
        a.close()
        low.join(60)
        high.join(60)
        assert done["high"] < done["low"]


def test_api_key_is_enforced(tiny_engine):
    with Server(tiny_engine, api_keys=("sekrit", "other-key"), max_len=1024) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="sekri").models.list()  # a prefix of a key is not the key
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
        for key in ("sekrit", "other-key"):
            assert s.client(api_key=key).completions.create(model="default", prompt="hi", max_tokens=2).usage
        assert httpx.get(s.url + "/health").status_code == 200


@pytest.mark.parametrize("body,status,code", [
    ("{not json", 400, "invalid_json"),
    ({"model": "default"}, 400, "invalid_value"),  # no messages
    ({"model": "default", "messages": []}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "max_tokens": -1}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "max_tokens": 10**6}, 400, "context_length_exceeded"),
    ({"model": "default", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "context_length_exceeded"),
    ({"model": "default", "messages": MSGS, "n": 2}, 400, "unsupported_parameter"),
    ({"model": "default", "messages": MSGS, "logit_bias": {"1": 5}}, 400, "unsupported_parameter"),
    ({"model": "default", "messages": MSGS, "frobnicate": 1}, 400, "unsupported_parameter"),
    ({"model": "default", "messages": MSGS, "temperature": -2}, 400, "invalid_value"),
    ({"model": "gpt-4", "messages": MSGS}, 404, "model_not_found"),
    # strict types: no coercion, bounded integers, finite numbers
    ({"model": "default", "messages": MSGS, "temperature": "0.5"}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "stream": "true"}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "logprobs": 1}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "max_tokens": 1.5}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "seed": 2**80}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "top_k": 2**40}, 400, "invalid_value"),
    ({"model": "default", "messages": MSGS, "max_tokens": 2**80}, 400, "invalid_value"),
    ('{"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_value"),
    ({"model": "default", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
    ({"model": "default", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "unsupported_content"),
    ({"model": "default", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "invalid_value"),
])
def test_bad_input_gets_openai_style_4xx(server, body, status, code):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_default_max_tokens_fill_the_context(server):
    """No max_tokens: chat generates up to the context (OpenAI's rule); completions default to 16."""
    c = server.client()
    r = c.chat.completions.create(model="default", messages=MSGS, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 1024
    r = c.completions.create(model="default", prompt="hi", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_content_parts_of_text_are_joined(server, tiny_engine):
    c = server.client()
    parts = [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the sea."}]
    a = c.chat.completions.create(model="default", messages=[{"role": "user", "content": parts}], max_tokens=8,
                                  temperature=0)
    b = c.chat.completions.create(model="default", messages=MSGS, max_tokens=8, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens and a.choices[0].message.content == b.choices[0].message.content


def test_server_limits(tiny_engine, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="openautoglm.access")
    with Server(tiny_engine, api_keys=("k1",), max_len=1024, max_body_bytes=2000, max_prompt_tokens=40,
                max_tokens_cap=8, max_streams_per_key=1) as s:
        hdr = {"authorization": "Bearer k1"}
        def post(body, headers=hdr, **kw):
            return httpx.post(s.url + "/v1/completions", headers=headers, timeout=60, **kw,
                              **({"json": body} if body is not None else {}))
        big = {"model": "default", "prompt": "x" * 3000}
        r = post(big)
        assert (r.status_code, r.json()["error"]["code"]) == (413, "request_too_large")

        def chunked():  # no content-length: the limit holds on the bytes received
            data = json.dumps(big).encode()
            for i in range(0, len(data), 500):
                yield data[i : i + 500]

        r = post(None, content=chunked(), headers={**hdr, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = post({"model": "default", "prompt": "word " * 60, "max_tokens": 2})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "context_length_exceeded")
        assert "word" not in r.json()["error"]["message"]  # never the prompt in an error body
        r = post({"model": "default", "prompt": "hi", "max_tokens": 9})
        assert r.status_code == 400 and "cap" in r.json()["error"]["message"]
        r = post({"model": "default", "prompt": "hi", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        chat = httpx.post(s.url + "/v1/chat/completions", headers=hdr, json={
            "model": "default", "messages": MSGS, "ignore_eos": True, "temperature": 0}).json()
        assert chat["usage"]["completion_tokens"] == 8  # no max_tokens: the cap, not the context
        assert post({"model": "default", "prompt": "hi", "max_tokens": 2}, headers={}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "openautoglm.access"]
    clf = re.compile(r'^127\.0\.0\.1 - (key0|-) \[\d{2}/\w{3}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
                     r'"(GET|POST) /\S* HTTP/1\.1" \d{3} (\d+|-)$')
    assert lines and all(clf.match(l) for l in lines), lines[:3]
    assert any('"POST /v1/completions HTTP/1.1" 413' in l for l in lines)
    assert any(" key0 " in l and '" 200 ' in l for l in lines) and any(" - - " in l and '" 401 ' in l for l in lines)
    assert not any("k1" in l for l in lines)  # the user is the key's index, never the key


def test_concurrent_requests_per_key_are_capped(tiny_engine):
    with Server(tiny_engine, api_keys=("k1", "k2"), max_len=1024, max_streams_per_key=1) as s:
        a = LongStream(s, headers={"authorization": "Bearer k1"})
        post = lambda key: httpx.post(s.url + "/v1/completions", headers={"authorization": f"Bearer {key}"},
                                      json={"model": "default", "prompt": "hi", "max_tokens": 2}, timeout=60)
        r = post("k1")
        assert (r.status_code, r.json()["error"]["code"]) == (429, "rate_limit_exceeded")
        assert post("k2").status_code == 200  # another key has its own allowance
        a.close()
        _wait(lambda: post("k1").status_code == 200)
