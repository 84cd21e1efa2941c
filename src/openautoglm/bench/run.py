"""``openautoglm bench``: ours and our peers, same machine, same run, same prompt, each in its own process.

Protocol (after llama-bench and mlx_lm.benchmark): greedy decoding of exactly ``gen_tokens`` tokens after a
prompt of exactly ``prompt_tokens`` tokens of real text (``pydoc_data.topics``, tokenized once here and handed
to every system as ids), one warm-up then ``trials`` timed runs; the median, min and max are reported.

The systems load one after another, each in its own process, and then stay loaded: every warm-up and trial is
a request to one of them, and the trials go round the systems in turn (one trial of each, then the next; the
order reversed every other round). A shared machine's slow spells, which last seconds to minutes, then fall on
every system alike instead of on whichever happened to run then, and the ratios between systems hold.
"""

from __future__ import annotations

import json
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InvalidParameterError
from ..progress import Progress
from .report import flatten, machine_info, plot, table, write_json

PEERS = ("llama.cpp", "llama-bench", "transformers")


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
        if p in ("llama.cpp", "llama-bench"):
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

    rows_wanted = [(str(n), b) for n in pps for b in bss]
    with tempfile.TemporaryDirectory() as td, Progress("bench", total=len(jobs) * (1 + len(rows_wanted) * (1 + trials)),
                                                       unit=" runs", enabled=progress) as pb:
        procs = []
        for i, (system, config) in enumerate(jobs):
            spec = {"system": system, "config": config, "model": str(path), "threads": threads, "prompts": prompts,
                    "gen_tokens": gen_tokens, "trials": trials, "batch_sizes": bss}
            prep = {}
            if system == "openautoglm" and (config == "default" or config.partition(":")[0].upper() in COMPILED_LEVELS):
                pb.update(0, info=f"{system} {config} filling the compile caches (separate process)")
                prep = prepare(spec, Path(td) / f"prep{i}.json", Path(td) / f"prep-err{i}.txt", timeout)
            procs.append(_Worker(spec, Path(td) / f"spec{i}.json", Path(td) / f"err{i}.txt", timeout))
            procs[-1].info.update(prep)
            pb.update(info=f"{system} {config} loaded")
        for n, b in rows_wanted:
            for w in procs:  # warm-up (a failed or skipped system does nothing)
                w.warm_up(n, b)
                pb.update(info=f"{w.spec['system']} {w.spec['config']} warm-up")
            for t in range(trials):
                for w in (procs if t % 2 == 0 else procs[::-1]):
                    w.trial(n, b)
                    pb.update(info=f"{w.spec['system']} {w.spec['config']} pp{n} b{b} trial {t + 1}")
        workers = [w.finish(rows_wanted, gen_tokens) for w in procs]

    rows = flatten(workers)
    machine = machine_info()
    if json_path:
        write_json(json_path, machine, rows, command)
    if plot_path:
        plot(plot_path, rows, f"{Path(path).name} | {machine['cpu']} | {threads} threads | "
                              f"gen {gen_tokens} | {trials} trials")
    return {"machine": machine, "results": rows, "table": table(rows)}


COMPILED_LEVELS = ("O2", "O3")  # levels that compile ahead of time (packages and kernel choices cached on disk)


def prepare(spec: dict, spec_path: Path, err_path: Path, timeout: float) -> dict:
    """Fill a compiled level's caches in a process of its own before the measured one starts, as a user's first
    start on a machine does: the rows then measure a warm start, like llama.cpp's, whose build is not counted either.
    Returns the compile's own wall time and peak RSS ({} if it failed: the measured worker then says why)."""
    w = _Worker({**spec, "prepare": True}, spec_path, err_path, timeout)  # its one reply: prepared, then it exits
    if w.ok:
        w.proc.stdin.close()
        w.proc.wait()
        w.err.close()
    return {"prepare_s": w.info["prepare_s"], "prepare_peak_rss_mb": w.info["peak_rss_mb"]} if w.info.get("prepared") \
        else {}


def summarize(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


class _Worker:
    """One system's worker process (``worker.py``), driven a request at a time over its stdin/stdout."""

    def __init__(self, spec: dict, spec_path: Path, err_path: Path, timeout: float):
        self.spec, self.timeout = spec, timeout
        self.err_path = err_path
        self.info: dict = {"system": spec["system"], "config": spec["config"]}
        self.rows: dict = {}  # (prompt, batch) -> {"trials": [...]} or {"skipped": reason}
        spec["spawn_wall"] = time.time()  # load_s counts from here: interpreter, imports, load
        spec_path.write_text(json.dumps(spec))
        self.err = open(err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "openautoglm.bench.worker", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        self.ok = True
        ready = self._read()
        if ready is not None:
            if ready.get("skipped"):
                self._fail(ready["reason"])
            else:
                self.info.update(ready)

    def _fail(self, reason: str) -> None:
        self.info.update(skipped=True, reason=reason)
        self.ok = False
        self.proc.kill()
        self.proc.wait()
        self.err.close()

    def _read(self) -> dict | None:
        """The worker's next reply; None (and the worker marked failed) when it died or timed out."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.timeout):
                self._fail(f"timed out after {self.timeout}s")
                return None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            last = (self.err_path.read_text().strip().splitlines() or ["no output"])[-1]
            self._fail(f"worker failed (exit {self.proc.returncode}): {last[:300]}")
            return None
        return json.loads(line)

    def _request(self, n: str, b: int) -> dict | None:
        try:
            self.proc.stdin.write(json.dumps({"op": "run", "prompt": n, "batch": b}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _read says how
        return self._read()

    def warm_up(self, n: str, b: int) -> None:
        if not self.ok:
            return
        r = self._request(n, b)
        if r is None:
            return
        if r.get("skipped"):
            self.rows[(n, b)] = {"skipped": r["reason"]}
            return
        self.info.setdefault("first_ttft_s", r["ttft_s"])  # the first request: load-to-first-token adds it
        self.rows[(n, b)] = {"trials": []}

    def trial(self, n: str, b: int) -> None:
        row = self.rows.get((n, b))
        if not self.ok or row is None or "skipped" in row:
            return
        r = self._request(n, b)
        if r is not None:
            row["trials"].append(r)

    def finish(self, rows_wanted: list, gen_tokens: int) -> dict:
        """The worker's result in ``report.flatten``'s input form; ends the process."""
        if self.ok:
            self.proc.stdin.write(json.dumps({"op": "end"}) + "\n")
            self.proc.stdin.flush()
            end = self._read()
            if end is not None:
                self.info.update(end)
                self.proc.wait()
                self.err.close()
        if not self.ok:
            return self.info
        results = []
        for n, b in rows_wanted:
            row = {"prompt_tokens": int(n), "gen_tokens": gen_tokens, "batch": b}
            got = self.rows[(n, b)]
            if "skipped" in got:
                results.append({**row, "skipped": True, "reason": got["skipped"]})
                continue
            ts = got["trials"]
            joules = [t["joules"] for t in ts]
            n_gen = sum(t["tokens"] for t in ts)
            results.append({
                **row, "trials": [{k: t[k] for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")} for t in ts],
                **{k: summarize([t[k] for t in ts]) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")},
                "cpu_s_per_token": sum(t["cpu_s"] for t in ts) / n_gen,
                "joules_per_token": None if None in joules else sum(joules) / n_gen})
        return {**self.info, "results": results}
