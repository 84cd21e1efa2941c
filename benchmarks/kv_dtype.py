"""The KV cache dtypes against each other: quality (KL divergence of the next-token distributions against the bf16
cache's, same weights, same kernels) and the cache's bytes.

One window of ``--ctx`` tokens of real text (the evaluation half of pydoc_data.topics) runs through the model in
chunks of ``--chunk`` over a cache of each dtype; every chunk after the first attends to the cache as decode
does (the int8 cache is read as codes x scales, its keys smoothed as ``Engine.compile`` calibrates them:
``runtime/kv_cache.py``), and the logits at every position are compared with the reference dtype's.

    python benchmarks/kv_dtype.py -m qwen2.5-coder-0.5b --ctx 2048 --json benchmarks/results/kv-dtype-qwen05-xeon-avx512.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def logits_over(engine, ids: torch.Tensor, dtype: torch.dtype, chunk: int) -> tuple[torch.Tensor, int]:
    from openautoglm.data import calibration_tokens
    from openautoglm.runtime.kv_cache import KVCache

    n, model = ids.shape[1], engine.model
    cache = KVCache.for_model(model, 1, n, dtype)
    cache.calibrate_keys(model, calibration_tokens(engine.tokenizer, 512))  # as Engine.compile does (int8 only)
    out = []
    with torch.inference_mode():
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            out.append(model(ids[:, a:b], torch.arange(a, b)[None], cache)[0].float())
    return torch.cat(out), cache.nbytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default="smollm2-135m-instruct")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16,int8")
    ap.add_argument("--reference", default="bf16")
    ap.add_argument("--opt", default="O1", help="level the engine is compiled at (prefill kernels: O1 = O3's)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from openautoglm import Engine
    from openautoglm.data import evaluation_text
    from openautoglm.runtime.kv_cache import KV_DTYPES

    names = a.dtypes.split(",")
    if a.reference not in names:
        names.insert(0, a.reference)
    e = Engine(model=a.model, progress=False)
    e.compile(a.opt, max_len=a.ctx)
    ids = e.tokenizer.encode(evaluation_text(), add_special_tokens=False)[: a.ctx]
    if len(ids) < a.ctx:
        sys.exit(f"the text has {len(ids)} tokens, fewer than --ctx {a.ctx}")
    x = torch.tensor([ids])
    runs = {}
    for n in names:
        t0 = time.perf_counter()
        lg, nbytes = logits_over(e, x, KV_DTYPES[n], a.chunk)
        runs[n] = (torch.log_softmax(lg.double(), -1), nbytes)
        print(f"{n}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ref, ref_bytes = runs[a.reference]
    target = torch.tensor(ids[1:])
    rows = []
    for n, (lp, nbytes) in runs.items():
        kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)[:-1]
        nll = -lp[:-1].gather(1, target[:, None])[:, 0]
        rows.append({"kv_dtype": n, "kv_bytes": nbytes, "bytes_vs_reference": nbytes / ref_bytes,
                     "kld_mean": float(kl.mean()), "kld_p99": float(torch.quantile(kl, 0.99)),
                     "kld_max": float(kl.max()), "top1_agreement": float((ref.argmax(-1) == lp.argmax(-1)).double().mean()),
                     "ppl": float(nll.mean().exp())})
    print(f"| KV dtype | bytes (x {a.reference}) | mean KLD vs {a.reference} | p99 | top-1 | ppl |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_dtype']} | {r['kv_bytes'] / 2**20:.1f} MiB ({r['bytes_vs_reference']:.3f}x) | "
              f"{r['kld_mean']:.6f} | {r['kld_p99']:.5f} | {100 * r['top1_agreement']:.1f}% | {r['ppl']:.3f} |")
    if a.json:
        from openautoglm.host import atomic_write_text, cpu_key

        atomic_write_text(a.json, json.dumps({"model": a.model, "ctx": a.ctx, "chunk": a.chunk, "opt": a.opt,
                                              "reference": a.reference, "cpu": cpu_key(),
                                              "threads": torch.get_num_threads(),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
