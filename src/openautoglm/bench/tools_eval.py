"""Tool-calling accuracy on the Berkeley Function Calling Leaderboard (BFCL) data, scored by its own AST checker.

The bfcl-eval package ships the data (``bfcl_eval/data/BFCL_v4_<category>.json`` and ``possible_answer/``) and
the checker (``eval_checker/ast_eval/ast_checker.py``). Install it with ``pip install --no-deps bfcl-eval``:
its declared dependencies are heavy and pin old versions; the checker itself needs none of them, but its module
imports the leaderboard's model table, so a stand-in table with our one entry is installed before the import.

Each entry's functions become OpenAI tools (BFCL's ``dict``/``float``/``tuple``/``any`` types mapped to JSON
schema; dots in names, which OpenAI's name rule forbids, become ``_`` and are mapped back before checking, as
BFCL does for OpenAI models). The model answers through :class:`toolcall.ChatPlan` with ``tool_choice``
(``auto`` by default: the model decides whether to call, which the ``irrelevance`` category needs) and the
grammar on (``--constrained on``) or off (the same prompt, the reply parsed but not constrained). Scoring:
``simple_python`` and ``multiple`` pass when the checker accepts the calls; ``irrelevance`` passes when the
reply calls no tool.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import types
from pathlib import Path

from ..errors import InvalidParameterError

CATEGORIES = ("simple_python", "multiple", "irrelevance", "parallel", "parallel_multiple")
MODEL_NAME = "openautoglm"
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "list": "array", "int": "integer",
          "bool": "boolean", "str": "string"}


def _bfcl():
    try:
        import bfcl_eval
    except ImportError:
        raise InvalidParameterError("eval-tools needs the BFCL data and checker: pip install --no-deps bfcl-eval") \
            from None
    if "bfcl_eval.constants.model_config" not in sys.modules:  # the real one imports every provider's SDK
        stub = types.ModuleType("bfcl_eval.constants.model_config")
        stub.MODEL_CONFIG_MAPPING = {MODEL_NAME: types.SimpleNamespace(underscore_to_dot=False)}
        sys.modules[stub.__name__] = stub
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return Path(bfcl_eval.__file__).parent / "data", ast_checker, Language


def to_schema(p: dict) -> dict:
    """A BFCL parameter schema as JSON schema."""
    p = copy.deepcopy(p)
    t = p.get("type")
    if t == "any":
        p.pop("type")
    elif t in _TYPES:
        p["type"] = _TYPES[t]
    if "properties" in p:
        p["properties"] = {k: to_schema(v) for k, v in p["properties"].items()}
    if isinstance(p.get("items"), dict):
        p["items"] = to_schema(p["items"])
    if isinstance(p.get("additionalProperties"), dict):
        p["additionalProperties"] = to_schema(p["additionalProperties"])
    for k in ("default", "optional"):  # documentation in BFCL; a "default" of the wrong type is common
        p.pop(k, None)
    if p.get("type") == "string" and isinstance(p.get("enum"), list):
        p["enum"] = [e for e in p["enum"] if isinstance(e, str)] or p.pop("enum")
    return p


def to_tools(functions: list[dict]) -> tuple[list[dict], dict[str, str]]:
    tools, names = [], {}
    for f in functions:
        safe = f["name"].replace(".", "_")[:64]
        names[safe] = f["name"]
        tools.append({"type": "function", "function": {"name": safe, "description": f.get("description", ""),
                                                       "parameters": to_schema(f.get("parameters", {}))}})
    return tools, names


def load(category: str, limit: int | None = None) -> list[dict]:
    data, _, _ = _bfcl()
    if category not in CATEGORIES:
        raise InvalidParameterError(f"unknown category {category!r} (one of {', '.join(CATEGORIES)})")
    rows = [json.loads(line) for line in (data / f"BFCL_v4_{category}.json").read_text().splitlines() if line]
    ans = data / "possible_answer" / f"BFCL_v4_{category}.json"
    if ans.is_file():
        truth = {r["id"]: r["ground_truth"] for r in map(json.loads, ans.read_text().splitlines()) if r}
        for r in rows:
            r["ground_truth"] = truth.get(r["id"])
    return rows[:limit]


def run(engine, categories, constrained: bool = True, limit: int | None = None, tool_choice: str = "auto",
        max_tokens: int = 256, progress: bool = True) -> dict:
    from ..toolcall import ChatPlan, parse

    _, ast_checker, Language = _bfcl()
    out = {"constrained": constrained, "tool_choice": tool_choice, "categories": {}}
    for cat in categories:
        rows = load(cat, limit)
        ok = n = 0
        t0 = time.time()
        fails = []
        for r in rows:
            msgs = r["question"][0]
            tools, names = to_tools(r["function"])
            try:
                plan = ChatPlan(engine.tokenizer, msgs, tools, tool_choice)
            except InvalidParameterError as e:  # a schema the grammar engine cannot take: counted as a failure
                fails.append({"id": r["id"], "error": str(e)[:200]})
                n += 1
                continue
            res = engine._generate([plan.prompt_ids], {"max_tokens": max_tokens,
                                                       "grammar": plan.grammar if constrained else None})[0]
            _, calls = parse(res.text, plan.tools, plan.glm4)
            got = [{names.get(c["function"]["name"], c["function"]["name"]): json.loads(c["function"]["arguments"])}
                   for c in calls]
            if cat == "irrelevance":
                good = not got
            elif not got:
                good = False
            else:
                check = ast_checker(r["function"], got, r["ground_truth"], Language.PYTHON, cat, MODEL_NAME)
                good = bool(check["valid"])
            ok += good
            n += 1
            if not good and len(fails) < 20:
                fails.append({"id": r["id"], "text": res.text[:300]})
            if progress:
                print(f"\r{cat}: {n}/{len(rows)} correct {ok} ({100 * ok / n:.1f}%)", end="", file=sys.stderr,
                      flush=True)
        if progress:
            print(file=sys.stderr)
        out["categories"][cat] = {"n": n, "correct": ok, "accuracy": round(100 * ok / max(1, n), 1),
                                  "seconds": round(time.time() - t0, 1), "first_failures": fails}
    return out
