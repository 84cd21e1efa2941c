"""One benchmark subprocess: load one system/configuration, run every prompt length and batch size, write
JSON. Run as ``python -m openautoglm.bench.worker SPEC.json OUT.json``; peak RSS is this process's own."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def rapl_energy_uj() -> int | None:
    """Package energy counter from RAPL, or None where the machine has none (then joules are "n/a")."""
    base = "/sys/class/powercap"
    try:
        total = 0
        found = False
        for d in os.listdir(base):
            if d.startswith("intel-rapl:") and d.count(":") == 1:
                with open(f"{base}/{d}/energy_uj") as f:
                    total += int(f.read())
                    found = True
        return total if found else None
    except OSError:
        return None


def summarize(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    from .systems import LlamaCpp, Ours, Skip, Transformers

    system, config, threads = spec["system"], spec["config"], spec["threads"]
    out = {"system": system, "config": config, "results": []}
    n_ctx = max(int(k) for k in spec["prompts"]) + spec["gen_tokens"] + 16  # the context each system is given
    t_init = None
    try:
        cls = {"openautoglm": Ours, "llama.cpp": LlamaCpp, "transformers": Transformers}.get(system)
        if cls is not None:
            cls.imports()  # the library itself, so that init_s is what a running program pays to load the model
        t_init = time.perf_counter()
        if system == "openautoglm":
            sysobj = Ours(spec["model"], config, threads, n_ctx)
        elif system == "llama.cpp":
            sysobj = LlamaCpp(spec["model"], config, threads, n_ctx)
        elif system == "transformers":
            sysobj = Transformers(spec["model"], config, threads)
        else:
            raise Skip(f"unknown system {system}")
    except Skip as e:
        out["skipped"], out["reason"] = True, str(e)
        _write(out_path, out)
        return 0
    out["load_s"] = time.time() - spec["spawn_wall"]  # cold start (interpreter + imports + load) to ready
    out["init_s"] = time.perf_counter() - t_init  # in a process that has imported the library: load to ready
    out["weight_bytes"] = sysobj.weight_bytes()

    for n_prompt, ids in spec["prompts"].items():
        for batch in spec["batch_sizes"]:
            row = {"prompt_tokens": int(n_prompt), "gen_tokens": spec["gen_tokens"], "batch": batch}
            try:
                first = sysobj.run(ids, spec["gen_tokens"], batch)  # warm-up
                if "first_ttft_s" not in out:  # the first request after loading: load-to-first-token adds it
                    out["first_ttft_s"] = first.ttft_s
                cpu0, e0 = time.process_time(), rapl_energy_uj()
                trials = [sysobj.run(ids, spec["gen_tokens"], batch) for _ in range(spec["trials"])]
                cpu = time.process_time() - cpu0
                e1 = rapl_energy_uj()
            except Skip as e:
                row.update(skipped=True, reason=str(e))
                out["results"].append(row)
                continue
            n_gen = sum(t.batch * t.gen_tokens for t in trials)
            row["trials"] = [{"ttft_s": t.ttft_s, "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s}
                             for t in trials]
            row["ttft_s"] = summarize([t.ttft_s for t in trials])
            row["prefill_tok_s"] = summarize([t.prefill_tok_s for t in trials])
            row["decode_tok_s"] = summarize([t.decode_tok_s for t in trials])
            row["cpu_s_per_token"] = cpu / n_gen
            row["joules_per_token"] = (e1 - e0) / 1e6 / n_gen if e0 is not None and e1 is not None else None
            out["results"].append(row)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    _write(out_path, out)
    return 0


def _write(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
