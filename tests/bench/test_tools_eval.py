"""eval-tools' wiring to BFCL: every function of the categories converts to tools our grammar engine takes; the
real AST checker (behind the stand-in model table) accepts each entry's own ground truth when it comes back
through our name mapping, and rejects a changed value; a run on the tiny model scores what it parses."""

import json

import pytest

from openautoglm.bench import tools_eval
from openautoglm.toolcall import tool_grammar, validate_tools

pytest.importorskip("bfcl_eval")


@pytest.mark.parametrize("cat", ["simple_python", "multiple", "irrelevance"])
def test_every_function_converts_to_an_enforceable_tool(cat):
    rows = tools_eval.load(cat)
    assert len(rows) >= 200
    bad = []
    for r in rows:
        tools, names = tools_eval.to_tools(r["function"])
        assert sorted(names.values()) == sorted(f["name"] for f in r["function"])
        try:
            tool_grammar(validate_tools(tools), "required")
        except Exception as e:  # noqa: BLE001
            bad.append((r["id"], str(e)[:100]))
    assert len(bad) <= len(rows) // 100, bad[:5]  # at most 1% refused, each named in the run's failures


def _first(v):
    """The first allowed value; nested dicts list the allowed values of each key too."""
    if isinstance(v, dict):
        return {k: _first(o[0]) for k, o in v.items() if o and o[0] != ""}
    return v


@pytest.mark.parametrize("cat", ["simple_python", "multiple"])
def test_ground_truth_passes_the_real_checker_and_a_change_fails(cat):
    _, check, Language = tools_eval._bfcl()
    for r in tools_eval.load(cat, 40):
        (fname, params), = r["ground_truth"][0].items()
        call = {fname: {k: _first(v[0]) for k, v in params.items() if v[0] != ""}}
        assert check(r["function"], [call], r["ground_truth"], Language.PYTHON, cat, tools_eval.MODEL_NAME)["valid"]
        k = next((k for k, v in call[fname].items() if isinstance(v, (int, float)) and not isinstance(v, bool)), None)
        if k is not None:
            wrong = {fname: {**call[fname], k: call[fname][k] + 1000}}
            assert not check(r["function"], [wrong], r["ground_truth"], Language.PYTHON, cat,
                             tools_eval.MODEL_NAME)["valid"]


def test_a_constrained_run_on_the_tiny_model(tiny_engine):
    out = tools_eval.run(tiny_engine, ["simple_python", "irrelevance"], constrained=True, limit=3,
                         tool_choice="required", max_tokens=128, progress=False)
    json.dumps(out)
    for c in ("simple_python", "irrelevance"):
        r = out["categories"][c]
        assert r["n"] == 3 and 0 <= r["correct"] <= 3
