"""The agent task suite: 30 tasks with checkable answers (benchmarks/agent_suite/tasks.json): a third SQL over
a bundled shop database (agent_suite/make_data.py, deterministic), a third search over bundled documents
(agent_suite/docs), a third Python (the sandbox); four need two tools. Expected answers are computed from the
reference solutions on the same data, never typed in (search answers are the documents' facts).

An answer passes when it contains the expected value: for a number, any number in the answer equal to it
(to 0.01, or 0.1% for large values; thousands separators ignored); for text, the text, case-insensitively.

    python benchmarks/agent_suite.py --model qwen2.5-coder-1.5b --json benchmarks/results/agent-suite-qwen1.5b.json
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).with_name("agent_suite")


def expected(task: dict, db: sqlite3.Connection):
    ref = task["ref"]
    if "value" in ref:
        return ref["value"]
    if "sql" in ref:
        return db.execute(ref["sql"]).fetchone()[0]
    env = {"db": db}
    exec(ref["python"], env)  # our own reference code, not the model's
    return env["answer"]


def passes(answer: str, want) -> bool:
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        nums = [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", answer or "")]
        return any(abs(x - want) <= max(0.01, 1e-3 * abs(want)) for x in nums)
    return str(want).lower() in (answer or "").lower()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--opt", default="auto")
    ap.add_argument("--max-steps", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated task ids")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--log", type=Path, default=None, help="the agent's JSON-lines log")
    ap.add_argument("--unsafe-python", action="store_true")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(HERE))
    from make_data import build

    from openautoglm import Engine
    from openautoglm.agent import Agent, default_tools

    tasks = json.loads((HERE / "tasks.json").read_text())
    if a.only:
        keep = set(a.only.split(","))
        tasks = [t for t in tasks if t["id"] in keep]
    work = Path(tempfile.mkdtemp(prefix="oag-agent-suite-"))
    dbp = build(work / "shop.sqlite")
    ref_db = sqlite3.connect(dbp)
    eng = Engine(a.model, progress=False)
    eng.compile(a.opt)
    all_tools = {t.name: t for t in default_tools(["python", "sql", "search"], db=dbp, docs=HERE / "docs",
                                                  unsafe_python=a.unsafe_python)}
    rows = []
    for t in tasks:
        want = expected(t, ref_db)
        agent = Agent(eng, [all_tools[n] for n in t["tools"]], max_steps=a.max_steps, log=a.log, progress=False)
        t0 = time.monotonic()
        out = agent.run(t["task"])
        ok = passes(out["answer"], want)
        steps = len(out["steps"]) + 1 + ("plan" in out)  # tool calls, the answer, the plan
        rows.append({"id": t["id"], "ok": ok, "expected": want, "answer": out["answer"],
                     "tools_called": [s["tool"] for s in out["steps"]], "tokens": out["tokens"],
                     "seconds": round(time.monotonic() - t0, 1), "seconds_per_step": round(out["seconds"] / steps, 2)})
        print(f"{t['id']:10s} {'PASS' if ok else 'fail'} want={want!r} got={out['answer'][:80]!r} "
              f"{[s['tool'] for s in out['steps']]} {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    n_ok = sum(r["ok"] for r in rows)
    summary = {"model": a.model, "opt": a.opt, "tasks": len(rows), "passed": n_ok,
               "success_pct": round(100 * n_ok / max(1, len(rows)), 1),
               "by_kind": {k: f"{sum(r['ok'] for r in rows if r['id'].startswith(k))}/"
                              f"{sum(r['id'].startswith(k) for r in rows)}" for k in ("sql", "search", "py")},
               "median_seconds_per_step": statistics.median(r["seconds_per_step"] for r in rows) if rows else None,
               "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.json:
        from openautoglm.host import atomic_write_text

        atomic_write_text(a.json, json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
