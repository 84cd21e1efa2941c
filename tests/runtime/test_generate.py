"""Generation on a tiny model with the real SmolLM2 tokenizer: batch == singles, seeds, stops, streaming."""

import pytest

PROMPTS = ["Hello", "The quick brown fox jumps over", "def f(x):\n    return", "東京タワー 😀 naïve café, 1 2 3 4 5 6"]


def test_batch_equals_single_runs(tiny_engine):
    batch = tiny_engine.generate(PROMPTS, max_tokens=20, ignore_eos=True)
    for p, r in zip(PROMPTS, batch):
        single = tiny_engine.generate(p, max_tokens=20, ignore_eos=True)[0]
        assert r.token_ids == single.token_ids
        assert r.text == single.text


def test_seeded_sampling_is_reproducible(tiny_engine):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    a, b = tiny_engine.generate("Hello", **kw), tiny_engine.generate("Hello", **kw)
    assert a[0].token_ids == b[0].token_ids
    others = {tuple(tiny_engine.generate("Hello", **{**kw, "seed": s})[0].token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters


def test_seed_is_per_request_in_a_batch(tiny_engine):
    kw = dict(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    alone = tiny_engine.generate("Hello", **kw)[0].token_ids
    in_batch = tiny_engine.generate(["Hello", "Other prompt here"], **kw)[0].token_ids
    assert alone == in_batch


def test_temperature_zero_equals_greedy(tiny_engine):
    greedy = tiny_engine.generate(PROMPTS[1], max_tokens=20, ignore_eos=True)[0].token_ids
    t0 = tiny_engine.generate(PROMPTS[1], max_tokens=20, temperature=0.0, top_k=5, top_p=0.5, seed=9,
                              ignore_eos=True)[0].token_ids
    assert greedy == t0


def test_max_tokens_and_finish_reason(tiny_engine):
    r = tiny_engine.generate("Hello", max_tokens=7, ignore_eos=True)[0]
    assert (r.finish_reason, r.completion_tokens, r.prompt_tokens) == ("length", 7, 1)


def test_stop_string_truncates_and_reports_stop(tiny_engine):
    full = tiny_engine.generate(PROMPTS[1], max_tokens=30, ignore_eos=True)[0].text
    assert len(full) > 12
    stop = full[8:12]
    first = full.find(stop)
    r = tiny_engine.generate(PROMPTS[1], max_tokens=30, ignore_eos=True, stop=[stop])[0]
    assert r.finish_reason == "stop"
    assert r.text == full[:first]


def test_stop_token_ids(tiny_engine):
    toks = tiny_engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True)[0].token_ids
    r = tiny_engine.generate(PROMPTS[0], max_tokens=20, ignore_eos=True, stop_token_ids=[toks[5]])[0]
    assert r.finish_reason == "stop"
    assert r.token_ids == toks[: toks.index(toks[5])]


@pytest.mark.parametrize("stop", [None, ["zzzz-never"]])
def test_stream_pieces_join_to_the_full_text(tiny_engine, stop):
    for p in PROMPTS:
        pieces = list(tiny_engine.stream(p, max_tokens=25, ignore_eos=True, stop=stop))
        assert "".join(pieces) == tiny_engine.infer(p, max_tokens=25, ignore_eos=True, stop=stop)
        assert all("\ufffd" not in x for x in pieces[:-1])


def test_stream_never_splits_multibyte_characters(tiny_engine):
    """Feed the detokenizer the byte-level tokens of emoji/CJK text; every piece is whole characters."""
    from openautoglm.runtime.generate import IncrementalDetokenizer

    text = "日本語のテキスト 😀🚀 naïve — ok"
    ids = tiny_engine.tokenizer.encode(text)
    d = IncrementalDetokenizer(tiny_engine.tokenizer)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens held back: they end mid-character


def test_chat_messages_use_the_template(tiny_engine):
    msgs = [{"role": "user", "content": "Hi"}]
    ids, _ = tiny_engine.encode_input(msgs)
    text = tiny_engine.tokenizer.decode(ids[0], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert tiny_engine.chat(msgs, max_tokens=5, ignore_eos=True) == tiny_engine.infer(msgs, max_tokens=5, ignore_eos=True)
