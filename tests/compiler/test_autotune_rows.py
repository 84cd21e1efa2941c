"""The kernel selector for a plan of several rows (a server's): decode is timed at the full batch and at one row,
and the choice is the implementation whose worst slowdown against the best at either count is least, so one
stream is not left on a kernel that only wins at the full batch."""

import torch

from openautoglm import Engine
from openautoglm.compiler import autotune

# rigged timings by row count: `bf16` (a GEMM on a weight copy) wins at the full batch by 2x and loses at one
# row by 10x; `gemv-a8` is the other way round, by less
SECONDS = {4: {"bf16": 0.5, "gemv-a8": 1.0}, 1: {"bf16": 10.0, "gemv-a8": 1.0}}


def _tune(tiny_engine_dir, oag_cache, monkeypatch, max_batch, tag=""):
    monkeypatch.setattr(autotune, "_time_all",
                        lambda fs, x, rounds=5: {n: SECONDS.get(x.shape[0], {}).get(n, 3.0) for n in fs})
    monkeypatch.setattr(autotune, "cache_file", lambda: oag_cache / f"autotune-rows-{max_batch}{tag}.json")  # (timings are cached)
    e = Engine(model=tiny_engine_dir, progress=False)
    e.quantize("int4", group_size=32, method="rtn")
    return autotune.tune_model(e.model, max_batch=max_batch, prefill_tokens=64, progress=False, kv_len=128)


def test_a_batched_plan_chooses_what_is_good_at_one_row_too(tiny_engine_dir, oag_cache, monkeypatch):
    from openautoglm import kernels

    if not kernels.gemv_path("int4-a8", 32):
        import pytest

        pytest.skip("this CPU has neither AVX2 nor AVX512-VNNI")
    s = _tune(tiny_engine_dir, oag_cache, monkeypatch, max_batch=4)
    decode = {k: v[0] for k, v in s["choices"].items() if k.startswith("int4")}
    assert decode and set(decode.values()) == {"gemv-a8"}, decode
    # a plan of one row never times the full batch: the one-row winner, as before
    s1 = _tune(tiny_engine_dir, oag_cache, monkeypatch, max_batch=1)
    assert {v[0] for k, v in s1["choices"].items() if k.startswith("int4")} == {"gemv-a8"}


def test_the_full_batch_winner_stays_when_it_is_no_worse_at_one_row(tiny_engine_dir, oag_cache, monkeypatch):
    SECONDS[1]["bf16"] = 1.0  # now bf16 ties gemv-a8 at one row and wins at four
    try:
        s = _tune(tiny_engine_dir, oag_cache, monkeypatch, max_batch=4, tag="-tie")
    finally:
        SECONDS[1]["bf16"] = 10.0
    decode = {k: v[0] for k, v in s["choices"].items() if k.startswith("int4")}
    assert decode and set(decode.values()) == {"bf16"}, decode
