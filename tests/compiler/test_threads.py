"""Thread counts: decode's is tuned (memory-bound, it may run best on fewer threads than the cores), prompts run on
every thread given (compute-bound), and a background build, which shares the machine with the engine it builds
for, does not time thread counts at all (beside a busy core, one thread always wins)."""

import time

import torch

from openautoglm import Engine
from openautoglm.compiler import autotune
from openautoglm.runtime.runner import ModelRunner


def _rig_one_thread_faster(monkeypatch):
    # a decode pass that is 3x faster on one thread: what a pass measured beside a busy core looks like
    monkeypatch.setattr(autotune, "_decode_pass",
                        lambda model, batch: lambda: time.sleep(0.001 if torch.get_num_threads() == 1 else 0.003))


def test_decode_threads_are_tuned_in_the_foreground_and_kept_in_a_background_build(monkeypatch):
    _rig_one_thread_faster(monkeypatch)
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        cache = {}
        assert autotune.tune_threads(model, 1, cache, "k") == 1  # the foreground believes its timings
        assert list(cache.values()) == [1] and torch.get_num_threads() == 2
        monkeypatch.setenv(autotune.BACKGROUND_ENV, "1")
        cache = {}
        assert autotune.tune_threads(model, 1, cache, "k") == 2  # the count it was given
        assert cache == {}  # and nothing for the foreground's load to find: it tunes there, quiet
    finally:
        torch.set_num_threads(was)


def test_prefill_runs_on_every_thread_while_decode_keeps_the_tuned_count(tiny_engine_dir):
    e = Engine(model=tiny_engine_dir, progress=False)
    e.compile("O1")
    was = torch.get_num_threads()
    seen = []
    hook = e.compiled.runner.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    try:
        torch.set_num_threads(1)  # decode's tuned count
        r = ModelRunner(e.compiled.runner, e.compiled.cache, prefill_threads=2)
        r.claim(1, 32)
        ids = torch.tensor([[5, 9, 13, 2, 7]])
        pos = torch.arange(5)[None]
        out = r.prefill(ids, pos)
        assert torch.get_num_threads() == 1  # restored for decode
        step = r.decode(torch.tensor([4]), torch.tensor([5]))
        assert seen == [2, 1]
        # the same numbers as one forward over the six tokens on a fresh cache
        ref = ModelRunner(e.compiled.runner, None)
        ref.claim(1, 32)
        full = ref.prefill(torch.tensor([[5, 9, 13, 2, 7, 4]]), torch.arange(6)[None])
        torch.testing.assert_close(out, full[:, :5], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step, full[:, 5], rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()
        torch.set_num_threads(was)
