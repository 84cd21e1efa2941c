"""Grammar-constrained decoding on a tiny random model with SmolLM2's real tokenizer.

A random model never closes JSON on its own, so these outputs exercise the mask and the closing steer at their
hardest. Oracles: ``jsonschema`` / ``json`` / ``re.fullmatch`` on every output; a reference decode loop that
re-runs the full uncached forward each step and takes the most likely token llguidance's matcher accepts
(bypassing the bitmask path); a mixed batch == each row alone."""

import json
import re

import jsonschema
import pytest
import torch

from openautoglm.errors import InvalidParameterError
from openautoglm.runtime.grammar import Constraint, Grammar, MaskJob, Vocab

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": ["string", "null"]}}, "required": ["point"]},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}},
                                "required": ["id"]}},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": -1,
                                                                          "maximum": 1}},
     "required": ["ok"]},
]


def _gen(engine, prompt, grammar, **kw):
    return engine.generate(prompt, grammar=grammar, **kw)[0]


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_json_schema_outputs_validate_and_close(tiny_engine, i):
    g = Grammar.json_schema(SCHEMAS[i])
    for seed in (None, 1, 2):
        kw = dict(max_tokens=96) if seed is None else dict(max_tokens=96, temperature=1.0, seed=seed)
        r = _gen(tiny_engine, "Give me JSON:", g, **kw)
        assert r.finish_reason == "stop", r.text  # closed within the budget, not cut by max_tokens
        jsonschema.validate(json.loads(r.text), SCHEMAS[i])


def test_any_json_regex_and_lark(tiny_engine):
    r = _gen(tiny_engine, "x", Grammar.json(), max_tokens=64, temperature=1.0, seed=3)
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict)
    pat = r"(yes|no), [a-z]{2,8}\."
    r = _gen(tiny_engine, "x", Grammar.regex(pat), max_tokens=40, temperature=1.0, seed=4)
    assert re.fullmatch(pat, r.text), r.text
    lark = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,3}/\n'
    r = _gen(tiny_engine, "x", Grammar.lark(lark), max_tokens=40, temperature=1.0, seed=5)
    assert r.finish_reason == "stop" and re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)", r.text), r.text


def test_constrained_greedy_equals_reference_loop(tiny_engine):
    """The cached, batched, bitmask path picks what a plain loop picks: full forward over the whole sequence,
    then the most likely token that llguidance's matcher accepts."""
    pat = r"[a-z]{1,12}\. (done|over)"
    g = Grammar.regex(pat)
    prompt = tiny_engine.tokenizer.encode("Say something:")
    got = _gen(tiny_engine, "Say something:", g, max_tokens=60)
    c = Constraint(g, Vocab.of(tiny_engine.tokenizer, tiny_engine.config.vocab_size, tiny_engine.eos_ids))
    m, ids, out = c.matcher, list(prompt), []
    with torch.inference_mode():
        while not m.is_stopped():
            logits = tiny_engine.model(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0, -1]
            for t in torch.argsort(logits, descending=True).tolist():
                if m.validate_tokens([t]) == 1:
                    break
            if t in tiny_engine.eos_ids:
                break
            assert m.consume_token(t)
            ids.append(t)
            out.append(t)
    assert got.token_ids == out
    assert re.fullmatch(pat, got.text)


def test_constrained_and_free_rows_share_a_batch(tiny_engine):
    g = Grammar.json_schema(SCHEMAS[0])
    prompts = ["Give me JSON:", "The quick brown fox"]
    from openautoglm.runtime.generate import generate
    from openautoglm.runtime.sampler import SamplingParams

    ps = [SamplingParams(max_tokens=48, grammar=g, temperature=1.0, seed=11),
          SamplingParams(max_tokens=24, ignore_eos=True)]
    ids = [tiny_engine.tokenizer.encode(p) for p in prompts]
    batch = generate(tiny_engine.model, tiny_engine.tokenizer, ids, ps, tiny_engine.eos_ids)
    for i in range(2):
        alone = generate(tiny_engine.model, tiny_engine.tokenizer, [ids[i]], [ps[i]], tiny_engine.eos_ids)[0]
        assert batch[i].token_ids == alone.token_ids
    jsonschema.validate(json.loads(batch[0].text), SCHEMAS[0])


def test_unenforceable_schema_keyword_is_named():
    with pytest.raises(InvalidParameterError, match="uniqueItems"):
        Grammar.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True})
    with pytest.raises(InvalidParameterError):
        Grammar.json_schema("{not json")
    with pytest.raises(InvalidParameterError):
        Grammar.lark("start: undefined_rule\n")


def test_lazy_grammar_starts_at_the_trigger(tiny_engine):
    """Free before the trigger (no mask), constrained after it, free again once it completes."""
    tok = tiny_engine.tokenizer
    vocab = Vocab.of(tok, tiny_engine.config.vocab_size, tiny_engine.eos_ids)
    c = Constraint(Grammar.regex(r" [0-9]+;", triggers=("CALL:",)), vocab)
    text = ""
    for t in tok.encode("hello there CALL", add_special_tokens=False):
        text += tok.decode([t])
        assert not c.advance(t, text) and not c.active
    assert MaskJob([c]).future is None  # a free row costs no mask
    t = tok.encode(":", add_special_tokens=False)[0]
    text += ":"
    c.advance(t, text)
    assert c.active
    logits = MaskJob([c]).apply(torch.zeros(1, tiny_engine.config.vocab_size))[0]
    allowed = [i for i in torch.nonzero(torch.isfinite(logits)).flatten().tolist()]
    assert allowed and all(re.fullmatch(r" [0-9]*|[0-9]*", tok.decode([i])) for i in allowed)
    for piece in (" 42", ";"):
        for t in tok.encode(piece, add_special_tokens=False):
            text += tok.decode([t])
            done = c.advance(t, text)
    assert not done and not c.active  # completed; free again (``once`` not set), may trigger once more
