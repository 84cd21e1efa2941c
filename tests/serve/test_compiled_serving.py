"""The server's scheduler on the compiled decode step (O2): requests that join and leave at different steps, with
chunked prefills between their decode steps, give the tokens each gives alone on the eager model (O0, the
oracle), up to a near-tie within O2's stated tolerance; and the compiled step really runs them."""

import threading

import pytest
import torch

from openautoglm import Engine
from openautoglm.runtime.generate import generate
from openautoglm.runtime.sampler import SamplingParams
from openautoglm.runtime.scheduler import Request, Scheduler

from server_util import Server

pytestmark = pytest.mark.compile

TOL = 1e-3  # O2's logits against O0's (tests/compiler/test_levels.py)
MAX_BATCH, MAX_LEN = 4, 256


@pytest.fixture(scope="module")
def engines(tiny_engine_dir, oag_cache):
    e0 = Engine(model=tiny_engine_dir, progress=False)
    e2 = Engine(model=tiny_engine_dir, progress=False).compile("O2", max_batch=MAX_BATCH, max_len=MAX_LEN)
    return e0, e2


def _prompts(e0):
    # lengths 3..~110 tokens: with 40 new tokens the longest cross the first length bucket (128)
    texts = ["Hi", "The sea is", "def f(x):\n    return", "Tell me a story " * 6, "One two three four " * 10,
             "Compilers turn programs into " * 9, "a b c d e f g " * 15]
    return [e0.tokenizer.encode(t) for t in texts]


def _agree_but_ties(e0, ids, a, b):
    """b (served) equals a (O0 alone) up to the first place they part, and there O0's two logits are a near-tie."""
    if a != b:
        i = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
        with torch.no_grad():
            lg = e0.model(torch.tensor([ids + a[:i]]))[0, -1]
        assert float(lg[a[i]] - lg[b[i]]) <= TOL * float(lg.abs().max()), (ids, i)


def _logprobs_match(e0, ids, toks, lps, tol=2e-3):
    """Each served token's log-probability is O0's at that position, given the same context: a row decoded over
    another request's keys and values (a cache row moved without its context) would not be, even where the tiny
    model's argmax happens not to change."""
    with torch.no_grad():
        ref = torch.log_softmax(e0.model(torch.tensor([ids + toks[:-1]]))[0].float(), -1)
    ref = ref[len(ids) - 1:].gather(-1, torch.tensor(toks)[:, None])[:, 0]
    assert len(lps) == len(toks)
    err = (ref - torch.tensor(lps)).abs().max()
    assert float(err) <= tol, (ids[:5], float(err))


def _serve(sched, prompts, max_tokens):
    """Submit every request at once (more than the rows: the rest queue and join as rows free up); tokens each."""
    stop = threading.Event()
    th = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    th.start()
    out = [[] for _ in prompts]
    lps = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def sink(i):
        def f(ev):
            if ev.token_id is not None:
                out[i].append(ev.token_id)
                lps[i].append(ev.logprob)
            if ev.finish_reason:
                assert ev.finish_reason == "length", ev
                done[i].set()
        return f

    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        sched.submit(Request(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink(i),
                             logprobs=0))
    try:
        for d in done:
            assert d.wait(300), "a request did not finish"
    finally:
        stop.set()
        th.join(timeout=10)
    return out, lps


def _alone(e0, ids, n):
    return generate(e0.model, e0.tokenizer, [ids], SamplingParams(max_tokens=n, temperature=0.0,
                                                                  ignore_eos=True))[0].token_ids


def test_continuous_batching_on_the_compiled_step_equals_each_request_alone(engines):
    e0, e2 = engines
    c = e2.compiled
    prompts = _prompts(e0)
    max_tokens = [40, 7, 25, 3, 40, 12, 30]  # leave at different steps: rows free up mid-batch and get reused
    # a small prefill chunk: later requests prefill over several steps while the others decode
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH, max_len=MAX_LEN,
                      prefill_chunk=16)
    calls0 = c.runner.compiled_calls
    served, lps = _serve(sched, prompts, max_tokens)
    for ids, n, got, lp in zip(prompts, max_tokens, served, lps):
        assert len(got) == n
        _agree_but_ties(e0, ids, _alone(e0, ids, n), got)
        _logprobs_match(e0, ids, got, lp)
    # the compiled step ran the decode steps (at both length buckets), not the eager fallback
    assert sched.compiled_steps > 0 and c.runner.compiled_calls - calls0 == sched.compiled_steps
    assert sched.compiled_steps >= 0.8 * (max(max_tokens) - 1)
    assert {128, 256} <= set(c.runner._steps)


def test_rows_moved_and_traded_keep_each_requests_context(engines):
    """Step by step: a request leaves and the one above it moves down into its free row; a long prompt then
    prefills in a low row while a decoding request above it trades rows with it. Every request still gives
    its tokens alone (a row moved without its context would not)."""
    e0, e2 = engines
    # the prefix cache off: this scenario is built on requests taking the lowest free row
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH, max_len=MAX_LEN,
                      prefill_chunk=16, prefix_cache=False)
    g = torch.Generator().manual_seed(0)
    ids = {k: torch.randint(3, 1000, (n,), generator=g).tolist() for k, n in
           {"A": 5, "B": 5, "C": 5, "D": 5, "E": 60}.items()}
    want = {"A": 10, "B": 2, "C": 40, "D": 40, "E": 20}
    out = {k: [] for k in ids}
    lps = {k: [] for k in ids}
    reqs = {}

    def submit(k):
        def sink(ev, k=k):
            if ev.token_id is not None:
                out[k].append(ev.token_id)
                lps[k].append(ev.logprob)
        reqs[k] = sched.submit(Request(ids[k], SamplingParams(max_tokens=want[k], temperature=0.0,
                                                              ignore_eos=True), sink, logprobs=0))

    for k in "ABCD":  # A, B, C on rows 0-2 prefill at once; D gets the chunk's last token and finishes later
        submit(k)
    for _ in range(200):
        if sched.idle:
            break
        sched.step()
        # B (2 tokens) leaves row 1 while D, on row 3, has just started decoding: D moves down into row 1.
        # Then, once A leaves row 0, E's long prompt prefills there (4 chunks) while C decodes above it: C trades.
        if "E" not in reqs and reqs["A"].finish_reason:
            submit("E")
    assert sched.idle
    for k in ids:
        assert len(out[k]) == want[k]
        _agree_but_ties(e0, ids[k], _alone(e0, ids[k], want[k]), out[k])
        _logprobs_match(e0, ids[k], out[k], lps[k])
    assert sched.row_moves >= 1 and sched.row_swaps >= 1, (sched.row_moves, sched.row_swaps)
    assert sched.compiled_steps > 0


def test_a_shared_prefix_on_the_compiled_step_equals_each_request_alone(engines):
    """The prefix cache on O2: six requests on one 64-token prefix over four rows; all but the first copy the
    prefix (from a running row or a kept one) and prefill only their tails, the rows move to decode on the
    compiled step, and each request gives its tokens alone on O0 (up to a near-tie), with O0's log-probabilities."""
    e0, e2 = engines
    g = torch.Generator().manual_seed(1)
    P = torch.randint(3, 1000, (64,), generator=g).tolist()
    prompts = [P + [1000 + i] + torch.randint(3, 1000, (2 + 3 * i,), generator=g).tolist() for i in range(6)]
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH, max_len=MAX_LEN,
                      prefill_chunk=16)
    max_tokens = [30, 8, 20, 12, 25, 6]
    served, lps = _serve(sched, prompts, max_tokens)
    assert sched.cached_tokens == 5 * 64
    for ids, n, got, lp in zip(prompts, max_tokens, served, lps):
        _agree_but_ties(e0, ids, _alone(e0, ids, n), got)
        _logprobs_match(e0, ids, got, lp)
    assert sched.compiled_steps > 0


def test_a_context_whose_bucket_was_not_built_runs_on_a_longer_step(engines, monkeypatch):
    """The server never compiles while serving: a context whose length bucket has no step runs on the next longer
    built one (the mask hides the extra slots), not eager, and still gives each request's tokens alone on O0."""
    e0, e2 = engines
    c = e2.compiled
    built = c.runner.has_step
    monkeypatch.setattr(c.runner, "has_step", lambda n: n != 128 and built(n))
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH, max_len=MAX_LEN,
                      prefill_chunk=16)
    lens = []
    pick = sched.runner._static_len
    monkeypatch.setattr(sched.runner, "_static_len", lambda *a: lens.append(pick(*a)) or lens[-1])
    prompts = _prompts(e0)[:4]  # every context under 128 tokens
    served, lps = _serve(sched, prompts, [10, 10, 10, 10])
    assert lens and set(lens) == {256} and sched.compiled_steps == len(lens)
    for ids, got, lp in zip(prompts, served, lps):
        _agree_but_ties(e0, ids, _alone(e0, ids, 10), got)
        _logprobs_match(e0, ids, got, lp)


def test_a_plan_smaller_than_the_server_decodes_eager(engines):
    e0, e2 = engines
    c = e2.compiled
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH * 2, max_len=MAX_LEN)
    assert sched.runner.cache is not c.cache and not sched.compact and sched.runner.cache.batch == MAX_BATCH * 2
    prompts = _prompts(e0)[:3]
    served, lps = _serve(sched, prompts, [6, 6, 6])
    for ids, got, lp in zip(prompts, served, lps):
        _agree_but_ties(e0, ids, _alone(e0, ids, 6), got)
        _logprobs_match(e0, ids, got, lp)
    assert sched.compiled_steps == 0


def test_http_server_on_the_compiled_engine_concurrent_equals_sequential(engines):
    _, e2 = engines
    with Server(e2, max_batch=MAX_BATCH, max_queue=16, max_len=MAX_LEN) as s:
        sched = s.app.state.scheduler
        assert sched.compact and sched.runner.cache is e2.compiled.cache  # the compiled runner serves
        c = s.client()
        prompts = [f"Request number {i}: " + "tell me more " * i for i in range(6)]

        def one(i):
            return c.completions.create(model="default", prompt=prompts[i], max_tokens=4 + 3 * i, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text

        alone = [one(i) for i in range(6)]
        out = [None] * 6
        ths = [threading.Thread(target=lambda i=i: out.__setitem__(i, one(i))) for i in range(6)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        assert out == alone
        assert s.app.state.scheduler.compiled_steps > 0


def test_constrained_requests_on_the_compiled_step_equal_eager(engines):
    """JSON-schema requests beside free ones on the compiled step: each gives the tokens it gives alone on O0
    with the same grammar (up to near-ties), and every constrained output validates."""
    import json

    import jsonschema

    from openautoglm.runtime.grammar import Grammar

    e0, e2 = engines
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["name", "n", "ok"], "additionalProperties": False}
    g = Grammar.json_schema(schema)
    prompts = _prompts(e0)[:5]
    params = [SamplingParams(max_tokens=48, grammar=g if i % 2 == 0 else None, ignore_eos=i % 2 == 1)
              for i in range(len(prompts))]
    sched = Scheduler(e2.model_runner(), e2.tokenizer, e2.eos_ids, max_batch=MAX_BATCH, max_len=MAX_LEN,
                      prefill_chunk=16)
    out = [[] for _ in prompts]
    reqs = [sched.submit(Request(p, sp, lambda ev, i=i: ev.token_id is not None and out[i].append(ev.token_id)))
            for i, (p, sp) in enumerate(zip(prompts, params))]
    for _ in range(500):
        if sched.idle:
            break
        sched.step()
    assert sched.idle and sched.compiled_steps > 0
    for ids, sp, r, got in zip(prompts, params, reqs, out):
        alone = generate(e0.model, e0.tokenizer, [ids], sp, e0.eos_ids)[0].token_ids
        _agree_but_ties(e0, ids, alone, got)
        if sp.grammar is not None and got == alone:
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(e0.tokenizer.decode(got)), schema)


def test_prefix_reuse_on_the_compiled_step_equals_uncached(engines):
    """Engine.generate on O2 twice with a shared prefix: the second re-reads only the tail, and gives the tokens
    (and decodes on the compiled step) as the same prompt without reuse does."""
    _, e2 = engines
    a = e2.tokenizer.encode("Compilers turn programs into " * 6)
    b = a + e2.tokenizer.encode(" and then they optimize them further", add_special_tokens=False)

    def gen(ids, reuse):
        if not reuse:
            e2.compiled.session["ids"] = None
        g = e2.new_generation([ids], e2._params(max_tokens=20, ignore_eos=True))
        for _ in g:
            pass
        return g.sequences[0].out_ids, g.reused

    calls = e2.compiled.runner.compiled_calls
    want, _ = gen(b, reuse=False)
    gen(a, reuse=False)
    got, k = gen(b, reuse=True)
    assert got == want and k >= len(a)
    assert e2.compiled.runner.compiled_calls - calls >= 3 * 19  # every decode step ran compiled
