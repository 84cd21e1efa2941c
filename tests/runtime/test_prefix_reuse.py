"""A single-prompt generation on a compiled engine (its planned cache) reuses the keys and values of the previous
generation's common prefix: cached == uncached (the same engine with the record dropped), token for token with
seeded sampling, for a chat growing turn by turn, a prompt that diverges mid-way, a prompt shorter than the
cache's content, and after the cache was used by something else (a batch: the record is dropped)."""

import pytest

from openautoglm import Engine

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def e1(tiny_engine_dir, oag_cache):
    return Engine(model=tiny_engine_dir, progress=False).compile("O1", max_batch=2, max_len=512)


def _gen(e, ids, reuse=True, n=12, **kw):
    if not reuse:
        e.compiled.session["ids"] = None
    g = e.new_generation([ids], e._params(max_tokens=n, ignore_eos=True, **kw))
    for _ in g:
        pass
    return g.sequences[0].out_ids, g.reused


def test_growing_chat_reuses_and_equals_uncached(e1):
    tok = e1.tokenizer
    msgs = [{"role": "user", "content": "Tell me about the sea and the waves."}]
    reused, prev = [], None
    for turn in range(4):
        ids = tok.encode_chat(msgs)
        want, k0 = _gen(e1, ids, reuse=False)
        # run the previous turn again so the cache holds it, then this turn with reuse
        if prev is not None:
            _gen(e1, prev, reuse=False)
        got, k = _gen(e1, ids)
        assert got == want and k0 == 0, turn
        reused.append(k)
        prev = ids
        msgs += [{"role": "assistant", "content": tok.decode(got)}, {"role": "user", "content": f"And then {turn}?"}]
    assert all(r > 10 for r in reused[1:])  # later turns re-read only the new tail


def test_divergent_and_shorter_prompts_and_a_batch_in_between(e1):
    tok = e1.tokenizer
    a = tok.encode("The quick brown fox jumps over the lazy dog, and then it runs far away")
    b = a[:8] + tok.encode(" something else entirely different", add_special_tokens=False)
    _gen(e1, a, reuse=False)
    for ids, min_reused in [(b, 8), (a[:5], 4), (a, 4)]:
        got, k = _gen(e1, ids, temperature=1.0, seed=3)
        saved = e1.compiled.session["ids"]
        want, _ = _gen(e1, ids, reuse=False, temperature=1.0, seed=3)
        e1.compiled.session["ids"] = saved  # (the uncached run left the same record)
        assert got == want and k >= min_reused
    g = e1.new_generation([a, b], e1._params(max_tokens=5, ignore_eos=True))  # a batch rewrites rows 0 and 1
    for _ in g:
        pass
    assert e1.compiled.session["ids"] is None
    got, k = _gen(e1, a)
    assert k == 0 and got == _gen(e1, a, reuse=False)[0]
