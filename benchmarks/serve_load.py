"""Load benchmark for ``openautoglm serve`` against llama.cpp's own ``llama-server`` (continuous batching,
``-np`` slots; built by ``make install-peers``) and llama-cpp-python's server, on the same GGUF, same run.

Each level of concurrency C runs C clients; each sends ``--requests`` (or enough for ``--min-requests`` in all)
streaming completions one after the other (greedy, ``--max-tokens`` new tokens), each with its own
``--prompt-tokens`` slice of real text from pydoc_data.topics, so neither server can serve a prompt from a cached
prefix (``--shared-prefix N`` puts one common N-token prefix, a system prompt, before every request's own text:
the prefix-caching workload). We record the aggregate generated tokens per second over the level's wall time,
and the p50/p99 of time to first token and of inter-token latency (gaps between streamed chunks). Both servers
are started here, on loopback, and stopped at the end.

    python benchmarks/serve_load.py --concurrency 1,4,16 --json benchmarks/results/serve-load-smollm2-xeon-avx512.json

Our server runs with its defaults (``--opt auto``: build O3 for ``--max-batch`` rows of ``--max-len`` first with
``openautoglm compile -m MODEL --max-batch 16 --max-len 1024``, or the run measures O1 beside a background
build). ``llama-server`` gets ``-np <max concurrency> -c <that x --max-len> -t <threads>``. ``ignore_eos`` on
every server, so every request generates exactly ``--max-tokens``. ``openautoglm-nocache`` is our server with
``--no-prefix-cache``.

    python benchmarks/serve_load.py --shared-prefix 768 --prompt-tokens 64 --concurrency 16 \
        --systems openautoglm,openautoglm-nocache,llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb(pid: int) -> float:
    """The server process's peak resident memory so far (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc, timeout=180):
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


async def one_request(client, url, prompt, max_tokens, extra):
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    stamps, n_tokens, usage = [], 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            for ch in d.get("choices") or []:
                if ch.get("text"):
                    stamps.append(time.perf_counter())
    n_tokens = usage["completion_tokens"] if usage else len(stamps)
    ttft = stamps[0] - t0 if stamps else float("nan")
    itl = [b - a for a, b in zip(stamps, stamps[1:])]
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return n_tokens, ttft, itl, cached


async def level(url, prompts, concurrency, requests, max_tokens, extra):
    """``prompts``: one distinct prompt per request, so no server can reuse a cached prefix."""
    import httpx

    # a new connection a request: llama-server (cpp-httplib) closes a kept-alive connection after a few requests,
    # which a pooled client sees as "Server disconnected" mid-run
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(c):
            out = []
            for i in range(requests):
                out.append(await one_request(client, url, prompts[(c * requests + i) % len(prompts)], max_tokens, extra))
            return out

        t0 = time.perf_counter()
        res = [r for w in await asyncio.gather(*(worker(c) for c in range(concurrency))) for r in w]
        wall = time.perf_counter() - t0
    toks = sum(r[0] for r in res)
    ttfts = sorted(r[1] for r in res)
    itls = sorted(x for r in res for x in r[2])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

    return {"concurrency": concurrency, "requests": len(res), "tokens": toks, "wall_s": wall, "tok_s": toks / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 99),
            "itl_p50": statistics.median(itls) if itls else float("nan"), "itl_p99": pct(itls, 99),
            "cached_prompt_tokens": sum(r[3] for r in res)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--min-requests", type=int, default=0,
                    help="at least this many requests per level in all (more per client at low concurrency)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--shared-prefix", type=int, default=0,
                    help="tokens of one common prefix before every prompt (a shared system prompt)")
    ap.add_argument("--opt", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="our server's runtime dtype")
    ap.add_argument("--max-len", type=int, default=1024, help="per-request context on every server")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--systems", default="openautoglm,llama-server",
                    help="openautoglm, openautoglm-nocache (--no-prefix-cache), llama-server, llama-cpp-python")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from openautoglm.data import prompt_tokens
    from openautoglm.formats import open_checkpoint
    from openautoglm.hub import resolve
    from openautoglm.tokenizer import Tokenizer

    path = resolve(a.model)
    tok = Tokenizer.from_gguf_metadata(open_checkpoint(path).tokenizer["metadata"])
    levels = [int(x) for x in a.concurrency.split(",")]
    per_client = {c: max(a.requests, -(-a.min_requests // c)) for c in levels}
    n_prompts = sum(c * per_client[c] for c in levels) + 1  # no prompt repeats, across levels either
    ids = prompt_tokens(tok, a.prompt_tokens * n_prompts + a.shared_prefix)
    shared, ids = ids[: a.shared_prefix], ids[a.shared_prefix :]
    prompts = [tok.decode(shared + ids[i * a.prompt_tokens : (i + 1) * a.prompt_tokens]) for i in range(n_prompts)]
    results = {}
    for system in a.systems.split(","):
        port = free_port()
        if system in ("openautoglm", "openautoglm-nocache"):
            cmd = [sys.executable, "-m", "openautoglm.cli", "serve", "--model", str(path), "--port", str(port),
                   "--opt", a.opt, "--dtype", a.dtype, "--max-batch", str(max(levels)), "--max-len", str(a.max_len),
                   "-q"] + (["--no-prefix-cache"] if system == "openautoglm-nocache" else [])
            extra = {"ignore_eos": True}
        elif system == "llama-server":
            exe = next((c for c in (os.environ.get("OPENAUTOGLM_LLAMA_SERVER"),
                                    str(Path(sys.prefix) / "peers" / "bin" / "llama-server"),
                                    shutil.which("llama-server")) if c and Path(c).is_file()), None)
            if exe is None:
                results[system] = {"skipped": True, "reason": "llama-server is not built (make install-peers)"}
                print(f"{system}: skipped: not built (make install-peers)", flush=True)
                continue
            n = max(levels)
            cmd = [exe, "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", str(n),
                   "-c", str(n * a.max_len), "-t", str(a.threads), "-tb", str(a.threads)]
            extra = {"ignore_eos": True}
        else:
            # interrupt_requests off: by default a new request aborts the stream in flight
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
                   "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads), "--n_ctx", "2048",
                   "--interrupt_requests", "False"]
            extra = {}
        # the server's log goes to a file: an unread pipe fills up and blocks the server
        log = open(Path(a.json or "serve_load").with_suffix(f".{system}.log"), "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/v1/models", proc)
            asyncio.run(level(url, prompts[-1:], 1, 1, 8, extra))  # warm-up
            results[system] = []
            first = 0
            for c in levels:
                n = per_client[c]
                r = asyncio.run(level(url, prompts[first : first + c * n], c, n, a.max_tokens, extra))
                first += c * n
                r["server_peak_rss_mb"] = peak_rss_mb(proc.pid)
                results[system].append(r)
                print(f"{system:18s} C={c:<3d} {r['tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']:.3f}s "
                      f"p99 {r['ttft_p99']:.3f}s  ITL p50 {1000 * r['itl_p50']:.1f}ms p99 {1000 * r['itl_p99']:.1f}ms  "
                      f"peak RSS {r['server_peak_rss_mb']:.0f} MB  cached prompt tokens {r['cached_prompt_tokens']}",
                      flush=True)
        except Exception as e:  # report, never skip silently
            results[system] = {"skipped": True, "reason": f"{type(e).__name__}: {e}"}
            print(f"{system}: skipped: {e}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    if a.json:
        from openautoglm.bench.report import machine_info

        out = {"machine": machine_info(), "command": " ".join(sys.argv), "results": results}
        tmp = Path(a.json + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
