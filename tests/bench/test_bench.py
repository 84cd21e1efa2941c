"""``openautoglm bench`` on a tiny model: the JSON schema, skipped systems with reasons, and the plot.
Timings are not checked (speed is measured by the benchmark, never by tests)."""

import json
import subprocess
import sys

import pytest

from openautoglm.bench.report import flatten, table
from openautoglm.bench.run import plan
from openautoglm.errors import InvalidParameterError

RESULT_KEYS = {"system", "config", "load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "weight_bytes",
               "gb_s", "cpu_s_per_token", "trials", "skipped"}


pytestmark = pytest.mark.compile  # the bench runs in subprocesses that load, quantize and compile


@pytest.fixture(scope="module")
def bench_out(tiny_engine_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "openautoglm.cli", "bench", "--model", str(tiny_engine_dir), "--configs",
           "O0:fp32,O0:bf16,O1:int4-g32,O0:w8a8,O9:fp32,O0:nosuch", "--peers", "llama.cpp,transformers", "--prompt-tokens", "8,16",
           "--gen-tokens", "4", "--trials", "2", "--batch-sizes", "1,2", "--threads", "1",
           "--json", str(d / "b.json"), "--plot", str(d / "b.png"), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads((d / "b.json").read_text()), d / "b.png", p.stdout


def test_json_schema(bench_out):
    data, _, _ = bench_out
    m = data["machine"]
    assert {"cpu", "flags", "cores", "versions", "commit"} <= set(m) and m["cores"] >= 1
    ran = [r for r in data["results"] if not r["skipped"]]
    # ours fp32, bf16, O1 int4, w8a8 and transformers fp32 + bf16, each at 2 prompt lengths x 2 batch sizes
    assert len(ran) == 6 * 2 * 2
    for r in ran:
        assert RESULT_KEYS <= set(r)
        assert len(r["trials"]) == 2 and r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["weight_bytes"] > 0 and r["peak_rss_mb"] > 0 and r["cpu_s_per_token"] > 0
        assert r["gb_s"] == pytest.approx(r["weight_bytes"] * r["decode_tok_s"] / r["batch"] / 1e9)
        assert r["joules_per_token"] is None or r["joules_per_token"] > 0
    assert {(r["system"], r["config"]) for r in ran} == {
        ("openautoglm", "O0:fp32"), ("openautoglm", "O0:bf16"), ("openautoglm", "O1:int4-g32"),
        ("openautoglm", "O0:w8a8"), ("transformers", "fp32"), ("transformers", "bf16")}
    bf16 = next(r for r in ran if r["config"] == "O0:bf16")
    fp32 = next(r for r in ran if r["config"] == "O0:fp32")
    assert bf16["weight_bytes"] * 2 == fp32["weight_bytes"]


def test_compiled_levels_are_measured_from_warm_caches(tiny_engine_dir, tmp_path):
    # O2 compiles its decode step ahead of time on a machine's first start. The bench fills the caches in a process
    # of its own first and reports that apart; the measured process, on an empty private cache otherwise, then
    # compiles nothing (before this, it compiled the packages and its peak RSS was the compile's)
    import os

    from conftest import private_cache

    env = {**os.environ, "OPENAUTOGLM_CACHE": str(private_cache(tmp_path / "cache"))}
    cmd = [sys.executable, "-m", "openautoglm.cli", "bench", "--model", str(tiny_engine_dir), "--configs", "O2:fp32",
           "--peers", "", "--prompt-tokens", "8", "--gen-tokens", "3", "--trials", "1", "--batch-sizes", "1",
           "--threads", "1", "--json", str(tmp_path / "b.json"), "--markdown"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    (r,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert not r["skipped"] and r["packages_built"] == 0
    assert r["prepare_s"] > 0 and r["prepare_peak_rss_mb"] > 0
    assert "compile caches filled by a separate process first" in p.stdout
    assert any((tmp_path / "cache" / "aoti").glob("decode-*.pt2"))  # the packages went to the private cache


def test_skipped_systems_say_why(bench_out):
    data, _, out = bench_out
    skipped = {(r["system"], r["config"]): r["reason"] for r in data["results"] if r["skipped"]}
    assert "unknown optimize level" in skipped[("openautoglm", "O9:fp32")]
    assert "unknown scheme" in skipped[("openautoglm", "O0:nosuch")]
    assert "gguf" in skipped[("llama.cpp", "gguf")].lower()
    assert out.count("skipped:") == len(skipped)


def test_plot_is_a_png_of_readable_size(bench_out):
    _, png, _ = bench_out
    import matplotlib.image as mpimg

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = mpimg.imread(png).shape[:2]
    assert w >= 1000 and h >= 300


def test_ratios_against_llama_cpp_in_table():
    workers = [
        {"system": "llama.cpp", "config": "gguf", "load_s": 1.0, "weight_bytes": 100, "peak_rss_mb": 10,
         "results": [_res(100.0, 300.0)]},
        {"system": "openautoglm", "config": "O0:bf16", "load_s": 1.0, "weight_bytes": 200, "peak_rss_mb": 20,
         "results": [_res(250.0, 1200.0)]},
    ]
    t = table(flatten(workers))
    ours = next(l for l in t.splitlines() if l.startswith("openautoglm"))
    assert [c.strip() for c in ours.split("|")][-2:] == ["2.50", "4.00"]  # decode x, prefill x


def _res(dec, pre):
    s = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    return {"prompt_tokens": 256, "gen_tokens": 128, "batch": 1, "ttft_s": s(256 / pre), "prefill_tok_s": s(pre),
            "decode_tok_s": s(dec), "cpu_s_per_token": 0.01, "joules_per_token": None, "trials": []}


def test_bad_options():
    with pytest.raises(InvalidParameterError):
        plan("O0:fp32", "vllm")
    p = subprocess.run([sys.executable, "-m", "openautoglm.cli", "bench", "--prompt-tokens", "abc"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_trials_do_not_reuse_the_previous_prefill(tiny_engine_dir, oag_cache):
    """Each timed trial prefills the whole prompt: a compiled engine's prefix record (single-prompt generations
    reuse the previous one's common prefix) is dropped between trials, as llama.cpp's reset does."""
    from openautoglm.bench.systems import Ours

    s = Ours(str(tiny_engine_dir), "O1:fp32", threads=1, n_ctx=256)
    ids = s.tokenizer.encode("The same prompt for every trial, as the bench runs it")
    seen, make = [], s.engine.new_generation
    s.engine.new_generation = lambda *a, **k: seen.append(make(*a, **k)) or seen[-1]  # observe each trial's run
    for _ in range(3):
        s.run(ids, 4, 1)
        assert s.engine.compiled.session["ids"][: len(ids)] == ids  # the record the next trial must not use
    assert [g.reused for g in seen] == [0, 0, 0]
