"""The default level ("auto"): O1 at once on a machine that has not built O3 for the model, O3 built by a
background process and switched to at the next generation, O3 at once on the next start; every stage generates
O0's tokens (the oracle), within the levels' stated tolerance."""

import time

import pytest
import torch

from openautoglm import Engine

from test_levels import _same_greedy

PROMPTS = ("Hello there", "def f(x):")


def test_auto_without_a_background_build_stays_at_o1(tiny_engine_dir, oag_cache, monkeypatch):
    monkeypatch.setenv("OPENAUTOGLM_BACKGROUND_BUILD", "0")
    e0 = Engine(model=tiny_engine_dir, progress=False)
    e = Engine(model=tiny_engine_dir, progress=False).compile(max_batch=2, max_len=128)
    assert e.optimize_level == "O1" and getattr(e, "_build", None) is None
    for p in PROMPTS:
        _same_greedy(e0, e, "O1", p)


@pytest.mark.compile
def test_auto_builds_o3_in_the_background_and_switches(tiny_engine_dir, oag_cache, monkeypatch):
    monkeypatch.setenv("OPENAUTOGLM_BACKGROUND_BUILD", "1")
    threads = torch.get_num_threads()
    e0 = Engine(model=tiny_engine_dir, progress=False)
    t0 = time.perf_counter()
    e = Engine(model=tiny_engine_dir, progress=False).compile(max_batch=2, max_len=128)
    assert time.perf_counter() - t0 < 60  # O1: no tuning, no ahead-of-time compile in this process
    assert e.optimize_level == "O1" and e._build is not None and e._build.proc is not None
    for p in PROMPTS:  # O1 serves while O3 builds
        _same_greedy(e0, e, "O1", p)
    assert e._build.proc.wait(timeout=1200) == 0, e._build.log.read_text()[-2000:]
    for p in PROMPTS:  # the first generation after the build runs at O3
        _same_greedy(e0, e, "O3", p)
        assert e.optimize_level == "O3"
    # the next start on this machine is warm: O3 at once, nothing built (a new process starts with torch's thread
    # count, which O3 tuned in this one)
    torch.set_num_threads(threads)
    e2 = Engine(model=tiny_engine_dir, progress=False).compile(max_batch=2, max_len=128)
    assert e2.optimize_level == "O3" and getattr(e2, "_build", None) is None
    assert e2.compiled.runner.packages_built == 0
    for p in PROMPTS:
        _same_greedy(e0, e2, "O3", p)
