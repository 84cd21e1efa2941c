"""``openautoglm bench``: ours and our peers, same machine, same run, same prompt, each in its own process.

Protocol (after llama-bench and mlx_lm.benchmark): greedy decoding of exactly ``gen_tokens`` tokens after a
prompt of exactly ``prompt_tokens`` tokens of real text (``pydoc_data.topics``, tokenized once here and handed
to every system as ids), one warm-up then ``trials`` timed runs; the median, min and max are reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InvalidParameterError
from ..progress import Progress
from .report import flatten, machine_info, plot, table, write_json

PEERS = ("llama.cpp", "transformers")


def parse_int_list(s: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise InvalidParameterError(f"{name} must be a comma-separated list of integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise InvalidParameterError(f"{name} must be positive integers, got {s!r}")
    return vals


def plan(configs: str, peers: str, peer_dtypes=("fp32", "bf16")) -> list[tuple[str, str]]:
    """(system, config) pairs: ours per --configs, then each peer."""
    jobs = [("openautoglm", c.strip()) for c in configs.split(",") if c.strip()]
    for p in [p.strip() for p in peers.split(",") if p.strip()]:
        if p not in PEERS:
            raise InvalidParameterError(f"unknown peer {p!r}; peers: {', '.join(PEERS)}")
        if p == "llama.cpp":
            jobs.append((p, "gguf"))
        else:
            jobs += [(p, d) for d in peer_dtypes]
    return jobs


def run_bench(model: str, configs: str = "O0:fp32,O0:bf16", peers: str = "llama.cpp,transformers",
              prompt_tokens="256", gen_tokens: int = 128, trials: int = 5, threads: int | None = None,
              batch_sizes="1", json_path=None, plot_path=None, progress: bool = True, timeout: float = 3600,
              command: str = "") -> dict:
    from ..formats import open_checkpoint
    from ..hub import resolve
    from ..tokenizer import Tokenizer
    from ..data import prompt_tokens as make_prompt

    if gen_tokens < 2 or trials < 1:
        raise InvalidParameterError("gen-tokens must be >= 2 and trials >= 1")
    pps = parse_int_list(prompt_tokens, "--prompt-tokens")
    bss = parse_int_list(batch_sizes, "--batch-sizes")
    threads = threads or os.cpu_count() or 1
    path = resolve(model)
    ck = open_checkpoint(path)
    src = ck.tokenizer
    tok = Tokenizer.from_gguf_metadata(src["metadata"]) if src["kind"] == "gguf" else Tokenizer.from_hf_dir(src["dir"])
    ctx = int(ck.config.get("max_position_embeddings", 2048))
    if max(pps) + gen_tokens > ctx:
        raise InvalidParameterError(f"prompt + generated tokens ({max(pps) + gen_tokens}) exceed the context ({ctx})")
    prompts = {str(n): make_prompt(tok, n) for n in pps}
    jobs = plan(configs, peers)

    workers = []
    with tempfile.TemporaryDirectory() as td, Progress("bench", total=len(jobs), unit=" systems",
                                                       enabled=progress) as pb:
        for i, (system, config) in enumerate(jobs):
            spec = {"system": system, "config": config, "model": str(path), "threads": threads, "prompts": prompts,
                    "gen_tokens": gen_tokens, "trials": trials, "batch_sizes": bss}
            sp, op = Path(td) / f"spec{i}.json", Path(td) / f"out{i}.json"
            spec["spawn_wall"] = time.time()  # load_s counts from here: interpreter, imports, load
            sp.write_text(json.dumps(spec))
            try:
                p = subprocess.run([sys.executable, "-m", "openautoglm.bench.worker", str(sp), str(op)],
                                   capture_output=True, text=True, timeout=timeout)
                if p.returncode != 0 or not op.exists():
                    last = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    w = {"system": system, "config": config, "skipped": True,
                         "reason": f"worker failed (exit {p.returncode}): {last[:300]}"}
                else:
                    w = json.loads(op.read_text())
            except subprocess.TimeoutExpired:
                w = {"system": system, "config": config, "skipped": True, "reason": f"timed out after {timeout}s"}
            workers.append(w)
            pb.update(info=f"{system} {config}")

    rows = flatten(workers)
    machine = machine_info()
    if json_path:
        write_json(json_path, machine, rows, command)
    if plot_path:
        plot(plot_path, rows, f"{Path(path).name} | {machine['cpu']} | {threads} threads | "
                              f"gen {gen_tokens} | {trials} trials")
    return {"machine": machine, "results": rows, "table": table(rows)}
