"""The agent's tools (SQLite, BM25 search, plugins) and its loop on the tiny random model: every call the loop
makes is valid for its tool (the grammar), bad arguments / tool exceptions / timeouts come back as observations
and never escape, the JSON output and the JSON-lines log have the stated shape, and the CLI answers bad input
with exit code 2."""

import json
import math
import sqlite3
import subprocess
import sys

import jsonschema
import pytest

from openautoglm.agent import Agent, Tool, default_tools, tool
from openautoglm.agent.tools import REGISTRY, SearchTool, SQLTool
from openautoglm.errors import InvalidParameterError


@pytest.fixture
def db(tmp_path):
    p = tmp_path / "shop.sqlite"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT, total REAL)")
    c.executemany("INSERT INTO orders VALUES (?, ?, ?)", [(i, f"c{i % 7}", i * 1.5) for i in range(1, 201)])
    c.commit()
    c.close()
    return p


def test_sql_answers_and_caps_rows(db):
    q = SQLTool(db, max_rows=10)
    out = json.loads(q("SELECT COUNT(*), SUM(total) FROM orders WHERE customer = 'c3'"))
    ref = sqlite3.connect(db).execute("SELECT COUNT(*), SUM(total) FROM orders WHERE customer = 'c3'").fetchone()
    assert out["rows"] == [list(ref)]
    out = json.loads(q("SELECT id FROM orders ORDER BY id"))
    assert [r[0] for r in out["rows"]] == list(range(1, 11)) and "truncated" in out


def test_sql_is_read_only_unless_opted_in(db):
    q = SQLTool(db)
    for stmt in ["DELETE FROM orders", "DROP TABLE orders", "INSERT INTO orders VALUES (999, 'x', 1)",
                 "CREATE TABLE t (x)", f"ATTACH DATABASE '{db.parent / 'new.db'}' AS m",
                 "PRAGMA query_only = OFF", "PRAGMA writable_schema = ON"]:
        assert q(stmt).startswith("[error")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 200
    assert not (db.parent / "new.db").exists()
    assert json.loads(q("PRAGMA table_info(orders)"))["rows"]  # reading the schema is fine
    w = SQLTool(db, writable=True)
    w("DELETE FROM orders WHERE id > 100")
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM orders").fetchone()[0] == 100


def test_sql_error_on_a_guessed_name_shows_the_schema(db):
    ddl = sqlite3.connect(db).execute("SELECT sql FROM sqlite_master WHERE name = 'orders'").fetchone()[0]
    for bad in ["SELECT price FROM orders", "SELECT * FROM order_items"]:
        out = SQLTool(db)(bad)
        assert out.startswith("[error: no such") and ddl in out
    assert ddl not in SQLTool(db)("SELEC 1")  # a syntax error is only the error


def test_sql_statement_timeout(db):
    q = SQLTool(db, timeout_s=0.5)
    out = q("WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT COUNT(*) FROM r")
    assert "limit" in out
    assert json.loads(q("SELECT 1"))["rows"] == [[1]]  # usable after an interrupt


def test_bm25_matches_the_formula(tmp_path):
    docs = {"a.md": "the cat sat on the mat", "b.txt": "dogs and cats and more dogs", "c.md": "quantum cat dynamics"}
    for k, v in docs.items():
        (tmp_path / k).write_text(v)
    s = SearchTool(tmp_path)
    toks = {k: v.split() for k, v in docs.items()}
    avg = sum(len(t) for t in toks.values()) / 3

    def ref(doc, q):  # Okapi BM25, idf = ln(1 + (N - df + 0.5) / (df + 0.5))
        out = 0.0
        for w in q.split():
            df = sum(w in t for t in toks.values())
            f = toks[doc].count(w)
            if f:
                out += math.log(1 + (3 - df + 0.5) / (df + 0.5)) * f * 2.5 / (f + 1.5 * (0.25 + 0.75 * len(toks[doc]) / avg))
        return out

    names = [f for f, _ in s.passages]
    for q in ("cat", "dogs", "cat dynamics", "mat"):
        assert s.scores(q) == pytest.approx([ref(n, q) for n in names])
    hits = json.loads(s("quantum cat"))
    assert hits[0]["file"] == "c.md" and s("zebra") == "[no passage matches]"


def test_plugins_register_by_decorator():
    @tool("word_count_test", "Count words.", {"type": "object", "properties": {"text": {"type": "string"}},
                                              "required": ["text"]})
    def wc(text):
        return str(len(text.split()))

    try:
        [t] = default_tools(["word_count_test"])
        assert t.call(text="a b c") == "3" and t.spec()["function"]["name"] == "word_count_test"
        with pytest.raises(InvalidParameterError, match="unknown tool"):
            default_tools(["nope"])
        with pytest.raises(InvalidParameterError, match="--db"):
            default_tools(["sql"])
    finally:
        REGISTRY.pop("word_count_test", None)


def test_agent_loop_on_a_random_model(tiny_engine, db, tmp_path):
    """The random model calls tools at random; whatever it does, every call is valid for its tool's schema, a
    failing or slow tool is an observation, the loop ends with an answer, and the log records each step."""
    calls = []

    def boom(x):
        calls.append(("boom", x))
        raise RuntimeError("tool exploded")

    def echo(x):
        calls.append(("echo", x))
        return "x" * 5000  # longer than the observation cap

    schema = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["x"], "additionalProperties": False}
    tools = [Tool("boom", "Always fails.", schema, boom), Tool("echo", "Echoes.", schema, echo),
             SQLTool(db).tool()]
    log = tmp_path / "agent.jsonl"
    for seed_task in ("Count the orders.", "What is the total of order 7?", "Find customer c3's orders."):
        out = Agent(tiny_engine, tools, max_steps=3, max_tokens=96, log=log, progress=False).run(seed_task)
        assert set(out) >= {"answer", "steps", "tokens", "seconds"} and isinstance(out["answer"], str)
        assert len(out["steps"]) <= 3 and out["tokens"] > 0
        for st in out["steps"]:
            params = {t.name: t.parameters for t in tools}[st["tool"]]
            jsonschema.validate(st["arguments"], params)
            if st["observation"].startswith("[you already called"):  # the loop guard (tested below)
                continue
            if st["tool"] == "boom":
                assert st["observation"] == "[error: boom failed: RuntimeError: tool exploded]"
            if st["tool"] == "echo":
                assert st["observation"].endswith("[... cut]")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events].count("task") == 3 and [e["event"] for e in events].count("done") == 3
    assert all(set(e) >= {"tool", "arguments", "observation"} for e in events if e["event"] == "step")


def test_bad_arguments_become_observations(tiny_engine):
    a = Agent(tiny_engine, [Tool("t", "x", {"type": "object", "properties": {"n": {"type": "integer"}},
                                            "required": ["n"]}, lambda n: str(n))], progress=False)
    assert a._call("t", {"n": "seven"}).startswith("[error: bad arguments for t")
    assert a._call("missing", {}).startswith("[error: there is no tool")
    assert a._call("t", {"n": 3}) == "3"


@pytest.mark.slow  # several CLI processes
def test_cli_agent_bad_input_exits_2(tmp_path):
    for args in (["--tools", "sql"], ["--tools", "nope"], ["--tools", "search", "--docs", str(tmp_path / "x")],
                 ["--max-steps", "0"]):
        p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "agent", "--task", "x", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_a_repeated_call_is_not_run_again(tiny_engine):
    """A random model, one tool with one possible argument: from the second call on, the observation is the
    loop guard's, and the tool ran once."""
    ran = []
    t = Tool("ping", "Ping.", {"type": "object", "properties": {"x": {"enum": [1]}}, "required": ["x"],
                               "additionalProperties": False}, lambda x: ran.append(x) or "pong")
    out = Agent(tiny_engine, [t], max_steps=3, max_tokens=64, progress=False, plan=False).run("go")
    pings = [s for s in out["steps"] if s["tool"] == "ping"]
    assert len(ran) == min(1, len(pings))
    assert all(s["observation"].startswith("[you already called ping") for s in pings[1:])


def test_the_step_after_a_repeat_is_sampled(tiny_engine):
    """The loop's own logic, with the model's replies scripted (the model is not under test here): ping, ping,
    ping, answer. The tool runs once; the repeats get the guard's observation; the steps after a repeat are
    sampled with a per-step seed, the others greedy."""
    from openautoglm.agent import RESAMPLE
    from openautoglm.toolcall import new_call

    ran, seen = [], []
    t = Tool("ping", "Ping.", {"type": "object", "properties": {"x": {"enum": [1]}}, "required": ["x"],
                               "additionalProperties": False}, lambda x: ran.append(x) or "pong")

    class Scripted(Agent):
        script = [("ping", {"x": 1})] * 3 + [("final_answer", {"answer": "done"})]

        def _generate(self, messages, sampling=None, **kw):
            seen.append(sampling)
            name, args = self.script[len(seen) - 1]
            return {"role": "assistant", "content": None, "tool_calls": [new_call(name, args)]}, 5

    out = Scripted(tiny_engine, [t], max_steps=5, progress=False, plan=False).run("go")
    assert out["answer"] == "done" and ran == [1]
    assert [s["observation"] for s in out["steps"]][0] == "pong"
    assert all(s["observation"].startswith("[you already called ping") for s in out["steps"][1:])
    assert seen == [None, None, {**RESAMPLE, "seed": 2}, {**RESAMPLE, "seed": 3}]


@pytest.mark.parametrize("max_steps", [5, 1])
def test_after_a_tool_error_the_model_must_act_again(tiny_engine, max_steps):
    """Scripted replies: a call the tool rejects, then a good call, then the answer. The step after the error is
    not offered final_answer (nor is the first step); the others are, and the last step always answers."""
    from openautoglm.toolcall import new_call

    t = Tool("ping", "Ping.", {"type": "object", "properties": {"x": {"enum": [1]}}, "required": ["x"],
                               "additionalProperties": False}, lambda x: "pong")
    offered = []

    class Scripted(Agent):
        script = [("ping", {"x": 2}), ("ping", {"x": 1}), ("final_answer", {"answer": "done"})]

        def _generate(self, messages, sampling=None, **kw):
            offered.append([s["function"]["name"] for s in kw["tools"]])
            choice = kw["tool_choice"]
            name, args = (("final_answer", {"answer": "gave up"}) if isinstance(choice, dict)
                          else self.script[len(offered) - 1])
            return {"role": "assistant", "content": None, "tool_calls": [new_call(name, args)]}, 5

    out = Scripted(tiny_engine, [t], max_steps=max_steps, progress=False, plan=False).run("go")
    assert out["steps"][0]["observation"].startswith("[error")
    if max_steps == 5:
        assert out["answer"] == "done" and out["steps"][1]["observation"] == "pong"
        assert offered == [["ping"], ["ping"], ["ping", "final_answer"]]
    else:  # the last step answers even right after an error
        assert out["answer"] == "gave up" and offered == [["ping"], ["ping", "final_answer"]]


def test_a_long_history_is_trimmed_to_fit_the_context(tiny_engine):
    """Scripted replies (the model is not under test): 24 calls whose results are 2000 characters each, in a
    2600-token context. Every step's prompt (real tokenizer and chat template) plus max_tokens fits; the oldest
    results are elided first, then the oldest calls dropped; the system message, the task and the last two calls
    with their full results stay; in a 700-token context those two results are shortened; and an agent whose
    history fits trims nothing."""
    from openautoglm.toolcall import new_call

    t = Tool("read", "Read page n.", {"type": "object", "properties": {"n": {"type": "integer"}},
                                      "required": ["n"], "additionalProperties": False},
             lambda n: f"page {n}: " + "lorem ipsum " * 300)

    def scripted(n_calls, **kw):
        lens, hist = [], []

        class Scripted(Agent):
            def _generate(self, messages, sampling=None, **k):
                plan = self._fit(messages, **k)
                lens.append(len(plan.prompt_ids))
                hist.append([dict(m) for m in messages])
                step = len(lens) - 1
                call = ("read", {"n": step}) if step < n_calls else ("final_answer", {"answer": "done"})
                return {"role": "assistant", "content": None, "tool_calls": [new_call(*call)]}, 5

        out = Scripted(tiny_engine, [t], max_steps=n_calls + 2, max_tokens=64, progress=False, plan=False,
                       **kw).run("go")
        return out, lens, hist

    # room for the last two results (~1000 tokens each) whole; 24 elided calls (~40 tokens each) do not fit too
    out, lens, hist = scripted(24, max_context=2600)
    assert out["answer"] == "done" and len(out["steps"]) == 24
    assert max(lens) + 64 <= 2600
    last = hist[-1]
    assert last[0]["role"] == "system" and last[1] == {"role": "user", "content": "go"}
    tool_msgs = [m["content"] for m in last if m["role"] == "tool"]
    assert tool_msgs[-2:] == [o["observation"] for o in out["steps"][-2:]]  # the last two stay whole
    assert all(c.startswith("[result elided") for c in tool_msgs[:-2])
    calls = [json.loads(m["tool_calls"][0]["function"]["arguments"])["n"] for m in last if m.get("tool_calls")]
    assert calls == list(range(calls[0], 24)) and calls[0] > 0  # the oldest were dropped, the rest kept in order
    # a context too small for even the last two results: those are shortened (from the start: what a reader
    # sees first), and every prompt still fits
    out, lens, hist = scripted(4, max_context=700)
    assert out["answer"] == "done" and max(lens) + 64 <= 700
    kept = [m["content"] for m in hist[-1] if m["role"] == "tool"]
    assert kept and all(c.endswith("[... cut to fit the context]") for c in kept)
    assert all(o["observation"].startswith(c.split("\n[... cut")[0]) for c, o in zip(kept, out["steps"][-len(kept):]))
    # a history that fits is left alone
    out2, lens2, hist2 = scripted(3, max_context=100000)
    assert all(not m["content"].startswith("[result elided") for m in hist2[-1] if m["role"] == "tool")
    assert [m.get("tool_calls") is not None for m in hist2[-1]].count(True) == 3
    with pytest.raises(InvalidParameterError, match="max_context"):
        Agent(tiny_engine, [t], max_tokens=64, max_context=64)
