"""Soak test: `openautoglm serve` under hours of mixed traffic, measured minute by minute.

    python benchmarks/soak.py --minutes 60 --clients 16 --json benchmarks/results/soak-smollm2-<kind>.json --plot soak.png

Starts the server on loopback (or uses --url), then runs C clients until the deadline, each picking at random:
a streaming or non-streaming chat or completion (greedy or sampled, 8-96 tokens), a stream the client drops
after a few chunks, a request with a deadline too short to meet, or a malformed body. Every request must be
answered: a success, or a documented error (4xx JSON, 408 timeout, a stream ended with finish_reason); a
connection error, a 5xx or no answer counts as lost. Every 5 s it samples the server's RSS (/proc) and KV bytes
in use (/metrics). Per minute it reports the RSS, KV bytes, p50/p99 latency of successful requests and the
outcome counts, and at the end the acceptance checks: RSS drift after minute 5 <= 5%, zero lost requests, p99 of
the last 10 minutes within 1.2x of minutes 5-15. Traffic goes to 127.0.0.1 only; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["Explain what a hash map is.", "Write a haiku about the sea.", "List three prime numbers.",
           "What does a KV cache store?", "Summarize the rules of chess in two sentences."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def one_request(cl: httpx.Client, rng: random.Random) -> tuple[str, float]:
    """(outcome, seconds): outcome is ok | expected:<why> | lost:<why>."""
    kind = rng.choices(["chat", "chat_stream", "completion", "completion_stream", "drop", "deadline", "malformed"],
                       weights=[3, 3, 2, 2, 1, 1, 1])[0]
    n = rng.randint(8, 96)
    sampling = {"temperature": 0} if rng.random() < 0.5 else {"temperature": 0.8, "top_p": 0.9, "seed": rng.randint(0, 99)}
    msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
    t0 = time.monotonic()
    try:
        if kind == "malformed":
            body = rng.choice(['{"messages": "nope"}', "{not json", '{"messages": [{"role": "user", "content": 5}]}',
                               json.dumps({"messages": msgs, "temperature": "hot"})])
            r = cl.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            ok = 400 <= r.status_code < 500 and "error" in r.json()
            return ("expected:4xx" if ok else f"lost:malformed->{r.status_code}"), time.monotonic() - t0
        if kind == "deadline":
            r = cl.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 512, "ignore_eos": True,
                                                       "timeout": 0.05, **sampling})
            if r.status_code == 408 or r.status_code == 200:
                return "expected:timeout", time.monotonic() - t0
            return f"lost:deadline->{r.status_code}", time.monotonic() - t0
        stream = kind.endswith("stream") or kind == "drop"
        path = "/v1/chat/completions" if kind.startswith("chat") or kind == "drop" else "/v1/completions"
        body = {"max_tokens": n, **sampling, "stream": stream}
        body.update({"messages": msgs} if path.endswith("chat/completions") else {"prompt": msgs[0]["content"]})
        if not stream:
            r = cl.post(path, json=body)
            if r.status_code != 200:
                return f"lost:{r.status_code}", time.monotonic() - t0
            r.json()["choices"][0]
            return "ok", time.monotonic() - t0
        with cl.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return f"lost:{r.status_code}", time.monotonic() - t0
            chunks, finish = 0, None
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunks += 1
                ch = json.loads(line[6:])["choices"]
                finish = (ch[0].get("finish_reason") if ch else None) or finish
                if kind == "drop" and chunks >= 3:
                    return "expected:dropped", time.monotonic() - t0
            if finish in ("stop", "length"):
                return "ok", time.monotonic() - t0
            return f"lost:finish={finish}", time.monotonic() - t0
    except httpx.HTTPError as e:
        return f"lost:{type(e).__name__}", time.monotonic() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--url", default=None, help="an already running server (default: start one)")
    ap.add_argument("--serve-args", default="--max-batch 16 --max-len 1024", help="extra `openautoglm serve` flags")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    proc = None
    if a.url is None:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "openautoglm.cli", "serve", "--model", a.model, "--port", str(port),
                                 "-q", "--access-log", "off", *a.serve_args.split()], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            proc.kill()
            sys.exit("the server did not start")
    else:
        url = a.url.rstrip("/")
    pid = proc.pid if proc else None
    t_start = time.monotonic()
    deadline = t_start + a.minutes * 60
    events: list[tuple[float, str, float]] = []  # (minute, outcome, seconds)
    samples: list[tuple[float, float, float]] = []  # (minute, rss MB, kv bytes)
    lock = threading.Lock()

    def client(i):
        rng = random.Random(a.seed * 1000 + i)
        with httpx.Client(base_url=url, timeout=120) as cl:
            while time.monotonic() < deadline:
                out, dt = one_request(cl, rng)
                with lock:
                    events.append(((time.monotonic() - t_start) / 60, out, dt))

    def sampler():
        while time.monotonic() < deadline:
            try:
                kv = metric(url, "openautoglm_kv_cache_bytes_in_use")
            except httpx.HTTPError:
                kv = float("nan")
            samples.append(((time.monotonic() - t_start) / 60, rss_mb(pid) if pid else float("nan"), kv))
            time.sleep(5)

    ths = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    ths.append(threading.Thread(target=sampler, daemon=True))
    for t in ths:
        t.start()
    while any(t.is_alive() for t in ths) and time.monotonic() < deadline + 180:
        sys.stderr.write(f"\r[soak] {(time.monotonic() - t_start) / 60:5.1f} / {a.minutes} min, {len(events)} requests")
        time.sleep(5)
    sys.stderr.write("\n")
    if proc:
        proc.terminate()
        proc.wait(60)

    minutes = []
    for m in range(int(a.minutes + 0.999)):
        ev = [e for e in events if m <= e[0] < m + 1]
        sm = [s for s in samples if m <= s[0] < m + 1]
        lat = [dt for _, o, dt in ev if o == "ok"]
        counts: dict[str, int] = {}
        for _, o, _ in ev:
            counts[o] = counts.get(o, 0) + 1
        minutes.append({"minute": m + 1, "requests": len(ev), "ok": len(lat), "p50_s": pct(lat, 0.5),
                        "p99_s": pct(lat, 0.99), "rss_mb": max((s[1] for s in sm), default=float("nan")),
                        "kv_bytes_max": max((s[2] for s in sm), default=float("nan")), "outcomes": counts})
    lost = sum(v for m in minutes for k, v in m["outcomes"].items() if k.startswith("lost"))
    after5 = [m["rss_mb"] for m in minutes[5:]]
    drift = (max(after5) - after5[0]) / after5[0] if len(after5) > 1 else float("nan")
    early = [dt for t, o, dt in events if o == "ok" and 5 <= t < 15]
    late = [dt for t, o, dt in events if o == "ok" and t >= a.minutes - 10]
    p99_ratio = pct(late, 0.99) / pct(early, 0.99) if a.minutes >= 25 and early and late else float("nan")
    checks = {"rss_drift_after_5_min": drift, "lost_requests": lost, "p99_last10_over_5to15": p99_ratio,
              "pass": lost == 0 and not drift > 0.05 and not p99_ratio > 1.2}  # (NaN: too short to apply)
    for m in minutes:
        print(f"min {m['minute']:3d}  req {m['requests']:5d}  ok {m['ok']:5d}  p50 {m['p50_s']:.2f}s  p99 {m['p99_s']:.2f}s  "
              f"RSS {m['rss_mb']:.0f} MB  KV {m['kv_bytes_max'] / 2**20:.1f} MiB  {m['outcomes']}")
    print(json.dumps(checks))
    if a.json:
        from openautoglm.host import atomic_write_text

        atomic_write_text(a.json, json.dumps({"args": vars(a), "minutes": minutes, "checks": checks}, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = [m["minute"] for m in minutes]
        fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
        ax[0].plot(x, [m["rss_mb"] for m in minutes]); ax[0].set_ylabel("RSS MB")
        ax[1].plot(x, [m["kv_bytes_max"] / 2**20 for m in minutes]); ax[1].set_ylabel("KV MiB (max)")
        ax[2].plot(x, [m["p50_s"] for m in minutes], label="p50")
        ax[2].plot(x, [m["p99_s"] for m in minutes], label="p99"); ax[2].set_ylabel("latency s"); ax[2].legend()
        ax[3].bar(x, [sum(v for k, v in m["outcomes"].items() if not k.startswith("ok")) for m in minutes])
        ax[3].set_ylabel("non-ok / min"); ax[3].set_xlabel("minute")
        fig.tight_layout()
        from openautoglm.host import atomic_path

        with atomic_path(a.plot) as tmp:
            fig.savefig(tmp, dpi=100)
    return 0 if checks["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
