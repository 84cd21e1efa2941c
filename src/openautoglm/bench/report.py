"""Machine description, the terminal table, the JSON file and the plot for ``openautoglm bench``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

from ..host import atomic_path, atomic_write_text

INTERESTING_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_int8", "amx_bf16", "avx_vnni", "neon", "asimd", "sve")


def machine_info() -> dict:
    import torch

    cpu, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("unknown", "", "x86_64"):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in INTERESTING_FLAGS if x in have]
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "llama_cpp", "openautoglm"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:
        pass
    return {"cpu": cpu, "flags": flags, "cores": os.cpu_count(), "mem_mb": mem, "os": platform.platform(),
            "versions": versions, "commit": commit}


def flatten(workers: list[dict]) -> list[dict]:
    """One result per (system, config, prompt length, batch), in the JSON schema of the bench issue."""
    rows = []
    for w in workers:
        base = {"system": w["system"], "config": w["config"]}
        if w.get("skipped"):
            rows.append({**base, "skipped": True, "reason": w["reason"]})
            continue
        for r in w["results"]:
            row = {**base, "prompt_tokens": r["prompt_tokens"], "gen_tokens": r["gen_tokens"], "batch": r["batch"]}
            if r.get("skipped"):
                rows.append({**row, "skipped": True, "reason": r["reason"]})
                continue
            dec = r["decode_tok_s"]["median"]
            rows.append({
                **row, "skipped": False,
                "load_s": w["load_s"], "ttft_s": r["ttft_s"]["median"],
                # load-to-first-token in a process that has imported the library: loading (and compiling from the
                # warm caches) plus the first request's time to its first token
                "ltft_s": w["init_s"] + w["first_ttft_s"] if "init_s" in w and "first_ttft_s" in w else None,
                "prefill_tok_s": r["prefill_tok_s"]["median"], "decode_tok_s": dec,
                "decode_tok_s_min": r["decode_tok_s"]["min"], "decode_tok_s_max": r["decode_tok_s"]["max"],
                "prefill_tok_s_min": r["prefill_tok_s"]["min"], "prefill_tok_s_max": r["prefill_tok_s"]["max"],
                "peak_rss_mb": w["peak_rss_mb"], "weight_bytes": w["weight_bytes"],
                # weights are read once per decode step, whatever the batch
                "gb_s": w["weight_bytes"] * dec / r["batch"] / 1e9,
                "cpu_s_per_token": r["cpu_s_per_token"], "joules_per_token": r["joules_per_token"],
                "trials": r["trials"],
                # compiled levels: the caches filled by a separate process first (run.prepare), and what the measured
                # process still compiled (0 when warm)
                **{k: w[k] for k in ("prepare_s", "prepare_peak_rss_mb", "packages_built") if w.get(k) is not None},
            })
    return rows


def pick_baseline(rows: list[dict]) -> str:
    """The peer the ratios are taken against: llama.cpp's own ``llama-bench`` where it ran, else llama-cpp-python."""
    ran = {r["system"] for r in rows if not r.get("skipped")}
    return "llama-bench" if "llama-bench" in ran else "llama.cpp"


def table(rows: list[dict], baseline: str | None = None) -> str:
    baseline = baseline or pick_baseline(rows)
    base = {}
    for r in rows:
        if not r.get("skipped") and r["system"] == baseline and r["batch"] == 1:
            base[r["prompt_tokens"]] = r
    head = ["system", "config", "pp", "B", "load s", "ltft s", "ttft s", "prefill t/s", "decode t/s (min-max)", "RSS MB",
            "weights MB", "GB/s", "cpu-s/tok", "J/tok", "decode x", "prefill x"]
    lines = []
    for r in rows:
        if r.get("skipped"):
            lines.append([r["system"], r["config"], str(r.get("prompt_tokens", "")), str(r.get("batch", "")),
                          "skipped: " + r["reason"]])
            continue
        b = base.get(r["prompt_tokens"])
        lines.append([
            r["system"], r["config"], str(r["prompt_tokens"]), str(r["batch"]), f"{r['load_s']:.2f}",
            "-" if r.get("ltft_s") is None else f"{r['ltft_s']:.2f}", f"{r['ttft_s']:.3f}", f"{r['prefill_tok_s']:.0f}",
            f"{r['decode_tok_s']:.1f} ({r['decode_tok_s_min']:.1f}-{r['decode_tok_s_max']:.1f})",
            f"{r['peak_rss_mb']:.0f}", f"{r['weight_bytes'] / 1e6:.0f}", f"{r['gb_s']:.1f}",
            f"{r['cpu_s_per_token']:.3f}", "n/a" if r["joules_per_token"] is None else f"{r['joules_per_token']:.3f}",
            f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}" if b else "-",
            f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f}" if b else "-",
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines if len(l) > i and len(l) == len(head))) if lines else len(h)
              for i, h in enumerate(head)]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-|-".join("-" * w for w in widths)]
    for l in lines:
        out.append(" | ".join(c.ljust(w) for c, w in zip(l, widths)) if len(l) == len(head) else " | ".join(l))
    return "\n".join(out + prepared_notes(rows))


def write_json(path: str | Path, machine: dict, rows: list[dict], command: str) -> None:
    atomic_write_text(path, json.dumps({"machine": machine, "command": command, "results": rows}, indent=1))


def plot(path: str | Path, rows: list[dict], title: str) -> None:
    """Three horizontal bar panels (decode tok/s with min-max, prefill tok/s, peak RSS), one bar per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if not r.get("skipped")][::-1]  # first result on top
    labels = [f"{r['system']} {r['config']}  pp{r['prompt_tokens']} B{r['batch']}" for r in ok]
    colors = {"openautoglm": "tab:blue", "llama.cpp": "tab:orange", "llama-bench": "tab:red", "transformers": "tab:green"}
    c = [colors.get(r["system"], "tab:gray") for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.5 + 0.38 * max(len(ok), 1)), sharey=True)
    panels = (("decode_tok_s", "decode tok/s  (higher is better)"), ("prefill_tok_s", "prefill tok/s  (higher is better)"),
              ("peak_rss_mb", "peak RSS MB  (lower is better)"))
    y = range(len(ok))
    for ax, (key, name) in zip(axes, panels):
        vals = [r[key] for r in ok]
        err = None
        if key != "peak_rss_mb":
            lo, hi = f"{key}_min", f"{key}_max"
            err = [[r[key] - r[lo] for r in ok], [r[hi] - r[key] for r in ok]]
        bars = ax.barh(y, vals, color=c, xerr=err, capsize=3)
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set_title(name, fontsize=10)
        ax.margins(x=0.15)
    axes[0].set_yticks(list(y), labels, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # (savefig picks the format from the suffix, which tmp keeps)
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], baseline: str | None = None) -> str:
    """The results as a markdown table, with decode/prefill/RSS ratios against ``baseline`` at batch 1."""
    baseline = baseline or pick_baseline(rows)
    base = {r["prompt_tokens"]: r for r in rows if not r.get("skipped") and r["system"] == baseline and r["batch"] == 1}
    out = ["| system | config | prompt | batch | load s | load-to-first-token s | TTFT s | prefill tok/s | decode tok/s (min–max) | "
           f"peak RSS MB | weights MB | GB/s | CPU-s/token | decode × {baseline} | prefill × | RSS × |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            out.append(f"| {r['system']} | {r['config']} | {r.get('prompt_tokens', '')} | {r.get('batch', '')} | "
                       f"skipped: {r['reason']} |||||||||||| ")
            continue
        b = base.get(r["prompt_tokens"])
        ratio = (lambda k: f"{r[k] / b[k]:.2f}") if b else (lambda k: "–")
        out.append(
            f"| {r['system']} | {r['config']} | {r['prompt_tokens']} | {r['batch']} | {r['load_s']:.2f} | "
            f"{'–' if r.get('ltft_s') is None else format(r['ltft_s'], '.2f')} | {r['ttft_s']:.3f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} "
            f"({r['decode_tok_s_min']:.1f}–{r['decode_tok_s_max']:.1f}) | {r['peak_rss_mb']:.0f} | "
            f"{r['weight_bytes'] / 1e6:.0f} | {r['gb_s']:.1f} | {r['cpu_s_per_token']:.3f} | "
            f"{ratio('decode_tok_s') if r['batch'] == 1 else '–'} | {ratio('prefill_tok_s') if r['batch'] == 1 else '–'} | "
            f"{ratio('peak_rss_mb')} |")
    return "\n".join(out + prepared_notes(rows))


def prepared_notes(rows: list[dict]) -> list[str]:
    """A line for each compiled configuration whose caches a separate process filled before it was measured."""
    seen = {}
    for r in rows:
        if r.get("prepare_s") is not None:
            seen[(r["system"], r["config"])] = r
    return [f"\n{s} {c}: compile caches filled by a separate process first ({r['prepare_s']:.1f} s, peak RSS "
            f"{r['prepare_peak_rss_mb']:.0f} MB); its rows measure a warm start" for (s, c), r in seen.items()]
