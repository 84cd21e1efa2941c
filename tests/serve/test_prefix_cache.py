"""The scheduler's prefix cache on the eager model (O0): requests that share a prompt prefix (a system prompt, a
chat growing turn by turn) take its keys and values from another cache row instead of computing them, and give
the tokens and log-probabilities each gives alone, uncached (the oracle, up to a near-tie). The counts of cached
tokens are exact, so a cache that never hits, or hits the wrong length, fails too."""

import threading

import pytest
import torch

from openautoglm.runtime.generate import generate
from openautoglm.runtime.sampler import SamplingParams
from openautoglm.runtime.scheduler import Request, Scheduler

from server_util import Server

TOL = 1e-4  # fp32 logits of a prompt prefilled in chunks against in one forward


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def _alone(eng, ids, n):
    r = generate(eng.model, eng.tokenizer, [ids], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
    return r.token_ids


def _check(eng, ids, got, lps):
    """got equals ids' tokens alone up to a near-tie, and each token's log-probability is the uncached one's given
    the same context (keys and values copied from the wrong row, or for the wrong length, would not be)."""
    want = _alone(eng, ids, len(got))
    with torch.no_grad():
        if want != got:
            i = next(k for k in range(len(got)) if want[k] != got[k])
            lg = eng.model(torch.tensor([ids + want[:i]]))[0, -1]
            assert float(lg[want[i]] - lg[got[i]]) <= TOL * float(lg.abs().max()), (ids[:4], i)
        ref = torch.log_softmax(eng.model(torch.tensor([ids + got[:-1]]))[0].float(), -1)
    ref = ref[len(ids) - 1:].gather(-1, torch.tensor(got)[:, None])[:, 0]
    assert float((ref - torch.tensor(lps)).abs().max()) <= 1e-3


def _sched(eng, cache=None, **kw):
    """A scheduler on the eager model (over ``cache``, when given: the runner's planned cache)."""
    from openautoglm.runtime.runner import ModelRunner

    kw = {"max_batch": 4, "max_len": 256, "prefill_chunk": 16, **kw}
    return Scheduler(ModelRunner(eng.model, cache), eng.tokenizer, eng.eos_ids, **kw)


class _Run:
    """Requests on a scheduler stepped by hand; tokens and log-probabilities per request."""

    def __init__(self, sched):
        self.s, self.out, self.lps, self.reqs = sched, [], [], []

    def submit(self, ids, n):
        i = len(self.out)
        self.out.append([])
        self.lps.append([])

        def sink(ev):
            if ev.token_id is not None:
                self.out[i].append(ev.token_id)
                self.lps[i].append(ev.logprob)
        self.reqs.append(self.s.submit(Request(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                               sink, logprobs=0)))
        return self.reqs[-1]

    def drain(self, steps=1000):
        for _ in range(steps):
            if self.s.idle:
                return
            self.s.step()
        raise AssertionError("the scheduler did not finish")


def test_a_shared_system_prompt_is_prefilled_once(tiny_engine):
    """Six requests on one 64-token prefix, submitted at once over four rows with 16-token prefill chunks: the
    first computes the prefix, the others wait for it and copy it (the two queued ones from a kept row), and
    compute only their own tails."""
    eng = tiny_engine
    P = _ids(64, 0)  # four whole chunks: the followers wait until the leader has written all of it
    tails = [[1000 + i] + _ids(3 + 2 * i, 10 + i) for i in range(6)]  # distinct first tokens: exactly 64 shared
    prompts = [P + t for t in tails]
    run = _Run(_sched(eng))
    for i, p in enumerate(prompts):
        run.submit(p, 6 + i)
    run.drain()
    assert [r.cached for r in run.reqs] == [0] + [64] * 5
    assert run.s.cached_tokens == 320 and run.s.prompt_tokens == sum(map(len, prompts))
    for p, got, lp in zip(prompts, run.out, run.lps):
        _check(eng, p, got, lp)
    # the same requests with the cache off give the same tokens, and compute every prompt token
    off = _Run(_sched(eng, prefix_cache=False))
    for i, p in enumerate(prompts):
        off.submit(p, 6 + i)
    off.drain()
    assert off.out == run.out and off.s.cached_tokens == 0


def test_a_chat_growing_turn_by_turn_reuses_the_generated_tokens(tiny_engine):
    """Turn 2's prompt is turn 1's prompt, its reply and a new message: the row turn 1 left keeps its prompt and
    every reply token it fed back (all but the last), and turn 2 starts after them, in place."""
    eng = tiny_engine
    run = _Run(_sched(eng))
    a = _ids(30, 1)
    run.submit(a, 10)
    run.drain()
    b = a + run.out[0] + _ids(7, 2)
    r2 = run.submit(b, 8)
    run.drain()
    assert r2.cached == len(a) + 9
    _check(eng, b, run.out[1], run.lps[1])
    # a third prompt that diverges inside turn 1's prompt reuses up to there only
    c = a[:20] + [1001] + _ids(5, 3)
    r3 = run.submit(c, 5)
    run.drain()
    assert r3.cached == 20
    _check(eng, c, run.out[2], run.lps[2])


def test_a_follower_whose_leader_is_cancelled_goes_on_with_what_was_written(tiny_engine):
    eng = tiny_engine
    run = _Run(_sched(eng))
    P = _ids(80, 4)
    leader = run.submit(P + [1000], 5)
    follower = run.submit(P[:70] + [1001, 1002], 5)
    run.s.step()  # the leader prefills its first 16 tokens; the follower waits for more of the shared 70
    assert leader.prefilled == 16 and follower.prefilled == 0 and not follower.matched
    run.s.cancel(leader)
    run.drain()
    assert leader.finish_reason == "cancelled" and follower.cached == 16
    _check(eng, follower.prompt_ids, run.out[1], run.lps[1])


def test_a_failed_request_leaves_nothing_to_reuse(tiny_engine, monkeypatch):
    """A request that fails mid-decode may leave a half-written step in its row: the row is not kept, and the next
    request on the same prompt computes it all."""
    import openautoglm.runtime.scheduler as scheduler_mod

    eng = tiny_engine
    run = _Run(_sched(eng, max_batch=1))
    p = _ids(40, 5)
    real = scheduler_mod.sample
    calls = {"n": 0}

    def flaky(logits, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 3:  # the step, then its retry alone: the request fails
            raise RuntimeError("injected")
        return real(logits, *a, **k)

    monkeypatch.setattr(scheduler_mod, "sample", flaky)
    r1 = run.submit(p, 6)
    run.drain()
    monkeypatch.setattr(scheduler_mod, "sample", real)
    assert r1.finish_reason == "error" and not run.s.kept
    r2 = run.submit(p + [1000], 6)
    run.drain()
    assert r2.cached == 0
    _check(eng, r2.prompt_ids, run.out[1], run.lps[1])


def test_the_server_reports_cached_tokens_and_answers_as_without_the_cache(tiny_engine):
    """Over HTTP, concurrent chat requests on one system prompt: the same answers with the prefix cache on and
    off, and ``usage.prompt_tokens_details.cached_tokens`` counts what the cache served."""
    system = "You are a careful assistant. " * 12
    questions = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]

    def serve(prefix_cache):
        with Server(tiny_engine, max_batch=4, max_len=512, prefill_chunk=32, prefix_cache=prefix_cache) as s:
            c = s.client()
            out = [None] * len(questions)

            def one(i):
                r = c.chat.completions.create(
                    model="default", max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": questions[i]}])
                out[i] = (r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens,
                          r.usage.prompt_tokens)
            ths = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            return out, s.app.state.scheduler.cached_tokens

    on, hits = serve(True)
    off, none = serve(False)
    assert [o[0] for o in on] == [o[0] for o in off]
    assert none == 0 and all(o[1] == 0 for o in off)
    sys_len = len(tiny_engine.tokenizer.encode_chat([{"role": "system", "content": system}]))
    assert sum(o[1] for o in on) == hits >= (len(questions) - 1) * (sys_len - 8)
    assert all(o[1] < o[2] for o in on)


def test_int8_kv_cache_concurrent_and_prefix_cached_equal_alone(tiny_engine):
    """The scheduler over an int8 KV cache (calibrated key smoothing): six requests sharing a 64-token prefix,
    concurrently with the prefix cache, give the tokens each gives alone on its own int8 cache with the prefix
    cache off, up to a near-tie in the int8 cache's own logits (a prompt's keys are attended quantized in one
    chunk or several alike)."""
    from openautoglm.runtime.kv_cache import KVCache

    eng = tiny_engine

    def cache(rows):
        c = KVCache.for_model(eng.model, rows, 256, torch.int8)
        c.calibrate_keys(eng.model, _ids(48, 9))
        return c

    P = _ids(64, 0)
    prompts = [P + [1000 + i] + _ids(3 + 2 * i, 10 + i) for i in range(6)]
    run = _Run(_sched(eng, cache=cache(4)))
    for i, p in enumerate(prompts):
        run.submit(p, 6 + i)
    run.drain()
    assert [r.cached for r in run.reqs] == [0] + [64] * 5
    for i, (p, got) in enumerate(zip(prompts, run.out)):
        alone = _Run(_sched(eng, cache=cache(1), max_batch=1, prefix_cache=False))
        alone.submit(p, 6 + i)
        alone.drain()
        want = alone.out[0]
        if want != got:
            k = next(j for j in range(len(got)) if want[j] != got[j])
            ids = torch.tensor([p + want[:k]])
            with torch.no_grad():
                lg = eng.model(ids, torch.arange(ids.shape[1])[None], cache(1))[0, -1]
            assert float(lg[want[k]] - lg[got[k]]) <= TOL * float(lg.abs().max()), (i, k)
