"""Tool calling and structured output through the real server and the official openai client, on a tiny random
model with SmolLM2's real tokenizer (whose template has no tool support: the generic format). A random model
is the hardest case for the grammar: nothing it writes is well-formed unless the constraint makes it so.

Oracles: jsonschema on every call's arguments and every structured reply; streamed == not streamed (the same
seed); concurrent constrained and free requests == the same requests one at a time; the server's prompt ==
the Python API's (``ChatPlan``) for a history with tool calls and tool results."""

import json
import threading

import httpx
import jsonschema
import pytest

from server_util import Server

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add numbers",
        "parameters": {"type": "object", "properties": {
            "values": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4}},
            "required": ["values"], "additionalProperties": False}}},
]
SCHEMA = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MSGS = [{"role": "user", "content": "What is the weather in Paris, and what is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tiny_engine):
    with Server(tiny_engine, max_batch=8, max_queue=32, max_len=1024) as s:
        yield s


def _valid_calls(calls, only=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id
        assert c.function.name in (only or SCHEMA)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMA[c.function.name])


def _streamed(chunks):
    """Accumulate tool_calls deltas as clients do (by index: id/name once, arguments appended)."""
    calls, content, reason = {}, "", None
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            cur = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            cur["id"] = cur["id"] or tc.id
            cur["name"] = cur["name"] or tc.function.name
            cur["arguments"] += tc.function.arguments or ""
        reason = ch.choices[0].finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice", [pytest.param("required", marks=pytest.mark.slow),
                                    {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_calls_are_well_formed_streamed_or_not(server, choice):
    c = server.client()
    only = None if choice == "required" else {"add"}
    for seed in range(6):
        kw = dict(model="default", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=160,
                  temperature=1.0, seed=seed)
        r = c.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        _valid_calls(msg.tool_calls, only)
        if only:
            assert len(msg.tool_calls) == 1  # a named tool is called once
        content, calls, reason = _streamed(c.chat.completions.create(stream=True, **kw))
        assert reason == "tool_calls" and content == (msg.content or "")
        assert [(x["name"], json.loads(x["arguments"])) for x in calls] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls]


def test_json_schema_response_format_validates(server):
    schema = {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror"]}, "minItems": 1, "maxItems": 3},
        "rating": {"type": "number"}},
        "required": ["title", "year", "genres"], "additionalProperties": False}
    c = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema, "strict": True}}
    for seed in range(5):
        r = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "A movie, as JSON"}],
                                      response_format=rf, max_tokens=120, temperature=1.0, seed=seed)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "JSON please"}],
                                  response_format={"type": "json_object"}, max_tokens=80, temperature=1.0, seed=1)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_of_tokens_the_grammar_rules_out(server, stream):
    """top_logprobs wider than what the grammar allows: the ruled-out tokens (logprob -inf, which JSON cannot
    carry) come back as -9999.0, as OpenAI and vLLM answer; every allowed one is finite. At the first step of
    a JSON object only blanks and tokens starting with "{" are allowed (the oracle); greedy: the chosen token
    is the top one."""
    body = {"model": "default", "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 3,
            "temperature": 0, "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 20,
            "stream": stream}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        entries = [e for ch in chunks for e in ((ch["choices"][0].get("logprobs") or {}).get("content") or [])]
    else:
        entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3
    for e in entries:
        assert len(e["top_logprobs"]) == 20
        assert e["token"] == e["top_logprobs"][0]["token"] and e["logprob"] == e["top_logprobs"][0]["logprob"]
    first = entries[0]["top_logprobs"]
    allowed = [t for t in first if t["logprob"] != -9999.0]
    assert allowed and len(allowed) < 20, "the grammar allowed no token, or everything: nothing was tested"
    assert all(t["token"].strip() == "" or t["token"].lstrip().startswith("{") for t in allowed)
    assert all(-9999.0 < t["logprob"] <= 0 for t in allowed)


def test_unenforceable_keyword_and_bad_tools_are_400(server):
    url = server.url + "/v1/chat/completions"
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    r = httpx.post(url, json={"messages": MSGS, "response_format": rf})
    assert r.status_code == 400 and "uniqueItems" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "response_format"
    for body, param in [({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
                        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")]:
        r = httpx.post(url, json={"messages": MSGS, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tool_history_renders_as_the_python_api_does(server, tiny_engine):
    from openautoglm.toolcall import ChatPlan

    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"values": [2, 3]}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    r = server.client().chat.completions.create(model="default", messages=history, tools=TOOLS, max_tokens=4,
                                                temperature=0)
    plan = ChatPlan(tiny_engine.tokenizer, history, TOOLS)
    assert r.usage.prompt_tokens == len(plan.prompt_ids)
    text = tiny_engine.tokenizer.decode(plan.prompt_ids)
    assert '"values": [2, 3]' in text and "<tool_response>\n5\n</tool_response>" in text and "get_weather" in text


def test_constrained_and_free_requests_concurrent_equal_sequential(server):
    c = server.client()

    def constrained(i):
        r = c.chat.completions.create(model="default", messages=MSGS, tools=TOOLS, tool_choice="required",
                                      max_tokens=100, temperature=1.0, seed=100 + i)
        return [(t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls]

    def free(i):
        return c.completions.create(model="default", prompt=f"Request {i}: tell me", max_tokens=12 + i,
                                    temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    jobs = [(constrained, i) for i in range(4)] + [(free, i) for i in range(4)]
    alone = [f(i) for f, i in jobs]
    out = [None] * len(jobs)
    ths = [threading.Thread(target=lambda k=k: out.__setitem__(k, jobs[k][0](jobs[k][1]))) for k in range(len(jobs))]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    assert out == alone


def test_auto_choice_leaves_plain_text_alone(server, tiny_engine):
    """In "auto" a reply with no <tool_call> is content, token for token what the model writes unconstrained."""
    c = server.client()
    r = c.chat.completions.create(model="default", messages=MSGS, tools=TOOLS, max_tokens=16, temperature=0)
    from openautoglm.toolcall import ChatPlan

    plan = ChatPlan(tiny_engine.tokenizer, MSGS, TOOLS)
    free = tiny_engine._generate([plan.prompt_ids], {"max_tokens": 16})[0]
    assert "<tool_call>" not in free.text  # the premise: a random model does not start a call here
    assert r.choices[0].message.content == (free.text.strip() or None) and not r.choices[0].message.tool_calls
