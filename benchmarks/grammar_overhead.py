"""What grammar-constrained decoding costs in decode speed, against the same run unconstrained.

Batch 1 (``Generation`` on the compiled engine, what ``Engine.chat(response_format=...)`` runs): each schema of
benchmarks/data/schemas50.json is generated constrained, then the same prompt unconstrained for exactly as
many tokens (``ignore_eos``); decode tok/s counts the tokens after the first over the time after the first.
16 concurrent (the server's ``Scheduler`` on the compiled step): 16 such requests at once, constrained, then
the same 16 free with the constrained lengths; aggregate tok/s over the whole run. Trials alternate the two
arms so host noise falls on both; the ratio is reported per trial and as the median.

    python benchmarks/grammar_overhead.py --model smollm2-135m-instruct --json benchmarks/results/grammar-overhead-smollm2-xeon.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

DATA = Path(__file__).with_name("data") / "schemas50.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--opt", default="O3")
    ap.add_argument("--schemas", type=int, default=8, help="schemas at batch 1 (the first N)")
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from openautoglm import Engine
    from openautoglm.runtime.sampler import SamplingParams
    from openautoglm.runtime.scheduler import Request, Scheduler
    from openautoglm.toolcall import ChatPlan

    cases = json.loads(DATA.read_text())
    eng = Engine(a.model, progress=False)
    eng.compile(a.opt, max_batch=a.concurrent, max_len=1024)
    print(f"compiled {a.opt}: {eng.compiled.info() if hasattr(eng.compiled, 'info') else ''}", file=sys.stderr)

    def plan_of(c):
        return ChatPlan(eng.tokenizer, [{"role": "user", "content": c["prompt"]}], response_format={
            "type": "json_schema", "json_schema": {"name": c["name"], "schema": c["schema"], "strict": True}})

    plans = [plan_of(c) for c in cases]

    def one(ids, params):
        g = eng.new_generation([ids], params)
        t_first = None
        n = 0
        for ev in g:
            if ev.token_id is not None:
                n += 1
                if t_first is None:
                    t_first = time.perf_counter()
        return n, time.perf_counter() - t_first

    def served(reqs):
        runner, cache, bucket = eng.compiled.runner, eng.compiled.cache, eng.compiled.len_bucket
        sched = Scheduler(runner, eng.tokenizer, eng.eos_ids, max_batch=a.concurrent, max_len=1024, cache=cache,
                          len_bucket=bucket)
        stop, done, counts = threading.Event(), threading.Semaphore(0), [0] * len(reqs)

        def sink(i):
            def f(ev):
                counts[i] += ev.token_id is not None
                if ev.finish_reason:
                    done.release()
            return f

        th = threading.Thread(target=sched.run, args=(stop,), daemon=True)
        t0 = time.perf_counter()
        for i, (ids, p) in enumerate(reqs):
            sched.submit(Request(ids, p, sink(i)))
        th.start()
        for _ in reqs:
            done.acquire()
        secs = time.perf_counter() - t0
        stop.set()
        th.join()
        return counts, secs, sched.compiled_steps

    one(plans[0].prompt_ids, SamplingParams(max_tokens=8))  # warm-up (the grammar engine's vocabulary too)
    one(plans[0].prompt_ids, SamplingParams(max_tokens=8, grammar=plans[0].grammar))
    res = {"model": a.model, "opt": a.opt, "batch1": [], "concurrent": []}
    for t in range(a.trials):
        tc = tf = nc = 0
        for p in plans[: a.schemas]:
            n, s = one(p.prompt_ids, SamplingParams(max_tokens=a.max_tokens, grammar=p.grammar))
            n2, s2 = one(p.prompt_ids, SamplingParams(max_tokens=n, ignore_eos=True))
            nc, tc, tf = nc + n - 1, tc + s, tf + s2
        row = {"tokens": nc, "constrained_tok_s": round(nc / tc, 1), "free_tok_s": round(nc / tf, 1),
               "ratio": round(tf / tc, 3)}
        res["batch1"].append(row)
        print("batch 1", row, file=sys.stderr)
        ps = [plans[i % len(plans)] for i in range(a.concurrent)]
        counts, secs, steps = served([(p.prompt_ids, SamplingParams(max_tokens=a.max_tokens, grammar=p.grammar))
                                      for p in ps])
        counts2, secs2, steps2 = served([(p.prompt_ids, SamplingParams(max_tokens=max(1, n), ignore_eos=True))
                                        for p, n in zip(ps, counts)])
        row = {"tokens": sum(counts), "constrained_tok_s": round(sum(counts) / secs, 1),
               "free_tok_s": round(sum(counts2) / secs2, 1), "ratio": round((sum(counts) / secs)
                                                                           / (sum(counts2) / secs2), 3),
               "compiled_steps": [steps, steps2]}
        res["concurrent"].append(row)
        print(f"{a.concurrent} concurrent", row, file=sys.stderr)
    for k in ("batch1", "concurrent"):
        res[k + "_median_ratio"] = statistics.median(r["ratio"] for r in res[k])
    print(json.dumps({k: v for k, v in res.items() if k.endswith("ratio")}))
    if a.json:
        from openautoglm.host import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
