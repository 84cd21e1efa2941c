"""llguidance against xgrammar on the 50-schema set: schema compile time, and the time of one token mask along
a valid output, for a model's vocabulary (what chose the engine in runtime/grammar.py).

For each schema an output is made by generating it constrained (llguidance, greedy, SmolLM2) once, then both
engines walk the same tokens: per token, fill the next-token bitmask, then accept the token. Schemas xgrammar
rejects, or outputs it rejects (a disagreement between the engines), are counted. xgrammar is optional
(``pip install xgrammar``); JSON separators are set to ours (compact items, blanks allowed) for both.

    python benchmarks/grammar_engines.py --model qwen2.5-coder-0.5b --json benchmarks/results/grammar-engines-qwen.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

DATA = Path(__file__).with_name("data") / "schemas50.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose vocabulary (and outputs)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import llguidance as llg
    import llguidance.torch as lt
    import xgrammar as xg
    from transformers import PreTrainedTokenizerFast

    from openautoglm import Engine
    from openautoglm.runtime.grammar import JSON_OPTIONS
    from openautoglm.toolcall import ChatPlan

    eng = Engine(a.model, progress=False)
    tok, V = eng.tokenizer, eng.config.vocab_size
    eos = sorted(eng.eos_ids)
    cases = json.loads(DATA.read_text())

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.backend.to_str(), n_vocab=V, eos_token=eos)
    ll_tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = xg.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.backend), vocab_size=V,
                                             stop_token_ids=eos)
    comp = xg.GrammarCompiler(info, cache_enabled=False)
    xg_tok_s = time.perf_counter() - t0

    rows = []
    for c in cases:
        plan = ChatPlan(tok, [{"role": "user", "content": c["prompt"]}], response_format={
            "type": "json_schema", "json_schema": {"name": c["name"], "schema": c["schema"]}})
        out = eng._generate([plan.prompt_ids], {"max_tokens": 256, "grammar": plan.grammar})[0].token_ids
        row = {"name": c["name"], "tokens": len(out)}
        # llguidance
        t0 = time.perf_counter()
        m = llg.LLMatcher(lltok, llg.LLMatcher.grammar_from_json_schema(c["schema"], defaults=dict(JSON_OPTIONS)))
        row["llg_compile_ms"] = (time.perf_counter() - t0) * 1e3
        bm = lt.allocate_token_bitmask(1, V)
        ts = []
        for t in out:
            t0 = time.perf_counter()
            lt.fill_next_token_bitmask(m, bm)
            ts.append(time.perf_counter() - t0)
            m.consume_token(t)
        row["llg_mask_us"] = statistics.median(ts) * 1e6
        row["llg_mask_max_us"] = max(ts) * 1e6
        # xgrammar
        try:
            t0 = time.perf_counter()
            cg = comp.compile_json_schema(json.dumps(c["schema"]), any_whitespace=True, separators=(",", ":"))
            xm = xg.GrammarMatcher(cg)
            row["xg_compile_ms"] = (time.perf_counter() - t0) * 1e3
            xb = xg.allocate_token_bitmask(1, V)
            ts, ok = [], True
            for t in out:
                t0 = time.perf_counter()
                xm.fill_next_token_bitmask(xb)
                ts.append(time.perf_counter() - t0)
                if not xm.accept_token(t):
                    ok = False
                    break
            row["xg_mask_us"] = statistics.median(ts) * 1e6
            row["xg_mask_max_us"] = max(ts) * 1e6
            row["xg_accepts_output"] = ok
        except Exception as e:  # noqa: BLE001 - a schema xgrammar refuses is a finding, not a crash
            row["xg_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def med(k):
        v = [r[k] for r in rows if k in r]
        return round(statistics.median(v), 2) if v else None

    summary = {"model": a.model, "vocab": V, "schemas": len(rows),
               "tokenizer_setup_s": {"llguidance": round(ll_tok_s, 2), "xgrammar": round(xg_tok_s, 2)},
               "compile_ms_median": {"llguidance": med("llg_compile_ms"), "xgrammar": med("xg_compile_ms")},
               "mask_us_median": {"llguidance": med("llg_mask_us"), "xgrammar": med("xg_mask_us")},
               "mask_us_worst_median": {"llguidance": med("llg_mask_max_us"), "xgrammar": med("xg_mask_max_us")},
               "xgrammar_refused_schemas": sum("xg_error" in r for r in rows),
               "xgrammar_rejected_outputs": sum(r.get("xg_accepts_output") is False for r in rows),
               "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if a.json:
        from openautoglm.host import atomic_write_text

        atomic_write_text(a.json, json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
