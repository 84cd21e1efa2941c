"""One benchmark subprocess: load one system/configuration, then run the generations the parent asks for (see
``run.py``), one at a time. Run as ``python -m openautoglm.bench.worker SPEC.json``; peak RSS is this process's
own. With ``"prepare": true`` in the spec it only fills the compile caches and exits (see ``run.prepare``)."""

from __future__ import annotations

import json
import os
import resource
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


def main(spec_path: str) -> int:
    """Load the system, report ready on stdout (one JSON line), then serve the parent's requests from stdin, one
    JSON line each way: ``{"op": "run", "prompt": "256", "batch": 1}`` runs one generation and replies with its
    timings; ``{"op": "end"}`` replies with this process's peak RSS and exits."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr: stdout's duplicate carries only the protocol
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    spec = json.loads(open(spec_path).read())
    from .systems import LlamaBench, LlamaCpp, Ours, Skip, Transformers

    system, config, threads = spec["system"], spec["config"], spec["threads"]
    n_ctx = max(int(k) for k in spec["prompts"]) + spec["gen_tokens"] + 16  # the context each system is given
    try:
        cls = {"openautoglm": Ours, "llama.cpp": LlamaCpp, "llama-bench": LlamaBench,
               "transformers": Transformers}.get(system)
        if cls is None:
            raise Skip(f"unknown system {system}")
        cls.imports()  # the library itself, so that init_s is what a running program pays to load the model
        t_init = time.perf_counter()
        sysobj = cls(spec["model"], config, threads) if cls is Transformers else cls(spec["model"], config, threads,
                                                                                      n_ctx)
    except Skip as e:
        send({"skipped": True, "reason": str(e)})
        return 0
    if spec.get("prepare"):
        # fill the compile caches (kernel choices, ahead-of-time packages) for every request the bench will make, then
        # exit: the measured worker then starts as a user's second start on this machine does
        for ids in spec["prompts"].values():
            for b in spec["batch_sizes"]:
                try:
                    sysobj.run(ids, 2, b)
                except Skip:
                    pass  # the measured worker reports it
        send({"prepared": True, "prepare_s": time.time() - spec["spawn_wall"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        return 0
    send({"load_s": time.time() - spec["spawn_wall"],  # cold start (interpreter + imports + load) to ready
          "init_s": time.perf_counter() - t_init,  # in a process that has imported the library: load to ready
          "weight_bytes": sysobj.weight_bytes()})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "end":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            if hasattr(sysobj, "peak_rss_mb"):  # a system that runs in a child process of its own
                rss = sysobj.peak_rss_mb()
            send({"peak_rss_mb": rss,
                  "packages_built": sysobj.packages_built() if hasattr(sysobj, "packages_built") else None})
            return 0
        cpu0, e0 = time.process_time(), rapl_energy_uj()
        try:
            t = sysobj.run(spec["prompts"][req["prompt"]], spec["gen_tokens"], req["batch"])
        except Skip as e:
            send({"skipped": True, "reason": str(e)})
            continue
        cpu, e1 = time.process_time() - cpu0, rapl_energy_uj()
        send({"ttft_s": t.ttft_s, "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s,
              "tokens": t.batch * t.gen_tokens, "cpu_s": cpu,
              "joules": (e1 - e0) / 1e6 if e0 is not None and e1 is not None else None})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
