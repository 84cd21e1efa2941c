"""Concurrent == alone on a real model: how often greedy tokens part, and whether every parting is a near-tie.

Each of ``--requests`` prompts (their own slices of real text, pydoc_data.topics, 16-160 tokens) is served alone
through the server's scheduler on the engine's runner (one request, one cache row), and then all of them at once
(``--max-batch`` rows; the rest queue and join as rows free up, with chunked prefills between decode steps), with
prefix caching on. Greedy, ``ignore_eos``, ``--max-tokens`` each. A request whose tokens differ is checked where
they first part: a near-tie when each side's token is in the other side's top 2 and, on each side, the two
tokens' log-probabilities differ by less than 0.01 (issue 21's rule). Any other parting is a failure (exit 1).
Tokens after a parting are not compared (the contexts differ from there on).

Batched rows run other kernels than one row (a GEMM over the rows, not the GEMV; padded attention lengths), so
their logits differ in the last bits; a near-tie is where those bits decide the argmax.

    python benchmarks/concurrency_ties.py -m smollm2-135m-instruct --opt O3 --requests 48 --max-tokens 64

``--shared-prefix N`` starts every prompt with one N-token slice (a system prompt) and compares, besides
concurrent against alone, concurrent with the prefix cache on against off (requests then prefill only their tails
after copying the prefix's keys and values).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

TIE_LOGPROB = 0.01


def run(sched, prompts: list[list[int]], max_tokens: int) -> list[list[tuple[int, dict[int, float]]]]:
    """Submit every prompt at once; (token, {top-2 id: logprob}) per generated token, per prompt."""
    from openautoglm.runtime.sampler import SamplingParams
    from openautoglm.runtime.scheduler import Request

    out = [[] for _ in prompts]

    def sink(i):
        def f(ev):
            if ev.token_id is not None:
                out[i].append((ev.token_id, dict(ev.top_logprobs or [])))
        return f

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.submit(Request(p, params, sink(i), logprobs=2))
    while not sched.idle:
        sched.step()
    return out


def compare(alone, together) -> dict:
    """Per request: identical, a near-tie parting (where) or a failure (where, the two sides' top 2)."""
    out = {"identical": 0, "near_ties": [], "failures": [], "tokens_compared": 0}
    for r, (a, b) in enumerate(zip(alone, together)):
        i = next((k for k in range(min(len(a), len(b))) if a[k][0] != b[k][0]), None)
        out["tokens_compared"] += len(a) if i is None else i + 1
        if i is None:
            out["identical"] += 1
            continue
        (ta, top_a), (tb, top_b) = a[i], b[i]
        tie = (ta in top_b and tb in top_a and abs(top_a[ta] - top_a[tb]) < TIE_LOGPROB
               and abs(top_b[ta] - top_b[tb]) < TIE_LOGPROB)
        rec = {"request": r, "position": i, "alone": {str(k): round(v, 5) for k, v in top_a.items()},
               "together": {str(k): round(v, 5) for k, v in top_b.items()}}
        (out["near_ties"] if tie else out["failures"]).append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default="smollm2-135m-instruct")
    ap.add_argument("--opt", default="O3", help="optimize levels, comma-separated (default O3)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens of one prefix before every prompt")
    ap.add_argument("--kv-dtype", default="auto", help="the KV cache's dtype (as serve --kv-dtype)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import torch

    from openautoglm import Engine
    from openautoglm.data import evaluation_text
    from openautoglm.runtime.scheduler import Scheduler

    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for level in a.opt.split(","):
        e = Engine(model=a.model, progress=False)
        e.compile(level, max_batch=a.max_batch, max_len=a.max_len, kv_dtype=a.kv_dtype)
        toks = e.tokenizer.encode(evaluation_text()[:400_000], add_special_tokens=False)
        g = torch.Generator().manual_seed(0)
        lens = torch.randint(16, 161, (a.requests,), generator=g).tolist()
        starts = torch.randint(0, len(toks) - 200, (a.requests,), generator=g).tolist()
        prefix = toks[-a.shared_prefix:] if a.shared_prefix else []
        prompts = [prefix + toks[s:s + n] for s, n in zip(starts, lens)]

        def sched(cache=True):
            return Scheduler(e.model_runner(compile_missing=False), e.tokenizer, e.eos_ids, max_batch=a.max_batch,
                             max_len=a.max_len, prefill_chunk=512, prefix_cache=cache)

        t0 = time.perf_counter()
        alone = [run(sched(), [p], a.max_tokens)[0] for p in prompts]
        s = sched()
        together = run(s, prompts, a.max_tokens)
        c = compare(alone, together)
        n = len(prompts)
        row = {"model": a.model, "level": e.optimize_level, "kv_dtype": a.kv_dtype, "requests": n,
               "max_tokens": a.max_tokens,
               "max_batch": a.max_batch, "shared_prefix": a.shared_prefix, "cached_tokens": s.cached_tokens,
               "compiled_steps": s.compiled_steps, **c, "near_tie_rate": len(c["near_ties"]) / n}
        if a.shared_prefix:
            off = sched(cache=False)
            nc = compare(run(off, prompts, a.max_tokens), together)
            row["cache_on_vs_off"] = {**nc, "near_tie_rate": len(nc["near_ties"]) / n}
            print(f"{a.model} {e.optimize_level}: prefix cache on ({s.cached_tokens} prompt tokens from the cache) vs "
                  f"off: {nc['identical']} identical, {len(nc['near_ties'])} part at a near-tie, "
                  f"{len(nc['failures'])} part otherwise", flush=True)
            c["failures"] += nc["failures"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(row)
        print(f"{a.model} {e.optimize_level}: {n} requests x {a.max_tokens} tokens, concurrent (max batch "
              f"{a.max_batch}) vs alone: {c['identical']} identical, {len(c['near_ties'])} part at a near-tie "
              f"({100 * row['near_tie_rate']:.1f}% of requests; {c['tokens_compared']} tokens compared), "
              f"{len(c['failures'])} part otherwise; compiled steps {s.compiled_steps}", flush=True)
        for f in c["failures"]:
            print("  failure:", json.dumps(f), flush=True)
        del e
    if a.json:
        from pathlib import Path

        from openautoglm.bench.report import machine_info
        from openautoglm.host import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps({"machine": machine_info(), "results": results}, indent=1))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
