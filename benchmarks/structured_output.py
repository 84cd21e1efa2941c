"""Structured output over the 50-schema set (benchmarks/data/schemas50.json): for each schema, the chat prompt
plus ``response_format={"type": "json_schema", "strict": true}``; an output counts as valid only if it parses,
validates against its schema (``jsonschema`` with format checking) and ended on its own (one cut by
max_tokens is a failure). ``--constrained off`` runs the same requests without the grammar (the schema is then
put in the system prompt, as a user of an unconstrained engine would), for the baseline.

    python benchmarks/structured_output.py --model smollm2-135m-instruct --json benchmarks/results/structured-smollm2.json

Rows run as one batch per ``--batch`` (constrained rows with different grammars share decode steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).with_name("data") / "schemas50.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--constrained", choices=["on", "off"], default="on")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--opt", default="O0", help="optimize level (O0 runs at once; the grammar is level-agnostic)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import jsonschema

    from openautoglm import Engine
    from openautoglm.runtime.sampler import SamplingParams
    from openautoglm.toolcall import ChatPlan

    cases = json.loads(DATA.read_text())[: a.limit]
    eng = Engine(a.model, progress=False)
    eng.compile(a.opt, max_batch=a.batch)
    rows, t0 = [], time.time()
    for k in range(0, len(cases), a.batch):
        chunk = cases[k: k + a.batch]
        prompts, params = [], []
        for c in chunk:
            msgs = [{"role": "user", "content": c["prompt"]}]
            if a.constrained == "on":
                plan = ChatPlan(eng.tokenizer, msgs, response_format={
                    "type": "json_schema", "json_schema": {"name": c["name"], "schema": c["schema"], "strict": True}})
                prompts.append(plan.prompt_ids)
                params.append(SamplingParams(max_tokens=a.max_tokens, grammar=plan.grammar))
            else:
                sys_msg = {"role": "system", "content": "Reply with JSON only, valid against this JSON schema: "
                           + json.dumps(c["schema"])}
                prompts.append(eng.tokenizer.encode_chat([sys_msg] + msgs))
                params.append(SamplingParams(max_tokens=a.max_tokens))
        g = eng.new_generation(prompts, params)
        for _ in g:
            pass
        for c, s in zip(chunk, g.sequences):
            text, err = s.text, None
            if s.finish_reason != "stop":
                err = f"finish_reason {s.finish_reason}"
            else:
                body = text.strip()
                if a.constrained == "off" and body.startswith("```"):  # be fair to the baseline: strip a fence
                    body = body.strip("`").removeprefix("json").strip()
                try:
                    jsonschema.validate(json.loads(body), c["schema"], format_checker=jsonschema.FormatChecker())
                except (ValueError, jsonschema.ValidationError) as e:
                    err = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append({"name": c["name"], "valid": err is None, "error": err, "tokens": len(s.out_ids),
                         "text": text})
            print(f"{c['name']:22s} {'ok ' if err is None else 'BAD'} {len(s.out_ids):4d} tok  {err or ''}",
                  file=sys.stderr)
    secs = time.time() - t0
    valid = sum(r["valid"] for r in rows)
    summary = {"model": a.model, "constrained": a.constrained, "schemas": len(rows), "valid": valid,
               "valid_pct": round(100 * valid / len(rows), 1), "max_tokens": a.max_tokens,
               "mean_tokens": round(sum(r["tokens"] for r in rows) / len(rows), 1), "seconds": round(secs, 1),
               "machine": os.uname().machine, "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.json:
        from openautoglm.host import atomic_write_text

        atomic_write_text(a.json, json.dumps(summary, indent=1) + "\n")
    return 0 if valid == len(rows) or a.constrained == "off" else 1


if __name__ == "__main__":
    sys.exit(main())
