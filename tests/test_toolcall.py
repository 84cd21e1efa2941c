"""The tool-call formats without a model: the parser against hand-written replies (Hermes/Qwen2.5 and GLM-4),
the streaming deltas against the whole-reply parse, and each grammar accepting exactly the well-formed calls
(llguidance's matcher walking the tokens of a reply: the grammar is the oracle for what may be generated)."""

import json

import pytest

from openautoglm.runtime.grammar import Constraint, Vocab
from openautoglm.toolcall import OPEN, CLOSE, ChatPlan, ToolStream, parse, tool_grammar, validate_tools

TOOLS = validate_tools([
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
])


def test_parse_hermes_blocks_and_content():
    text = (f'Let me check.\n{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n{CLOSE}\n'
            f'{OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n{CLOSE}')
    content, calls = parse(text, TOOLS)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
    # an undeclared tool or broken JSON stays content
    bad = f'{OPEN}{{"name": "rm_rf", "arguments": {{}}}}{CLOSE} {OPEN}{{"name": "add", "argu{CLOSE}'
    assert parse(bad, TOOLS) == (bad, [])


def test_parse_glm4():
    content, calls = parse('add\n{"a": 3, "b": 4}', TOOLS, glm4=True)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"a": 3, "b": 4}
    assert parse("Just text.", TOOLS, glm4=True) == ("Just text.", [])


@pytest.mark.parametrize("text", [
    f'Sure.\n{OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n{CLOSE}\nDone.',
    f'{OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n{CLOSE}\n{OPEN}\n{{"name": "get_weather", '
    f'"arguments": {{"city": "Rome"}}}}\n{CLOSE}',
    "No tools needed <tool but not a call",
])
def test_stream_deltas_equal_the_whole_reply(smollm2_tokenizer_meta, text):
    from openautoglm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(smollm2_tokenizer_meta)
    plan = ChatPlan(tok, [{"role": "user", "content": "x"}], TOOLS, "auto")
    ts = ToolStream(plan)
    deltas = []
    for i in range(0, len(text), 3):  # any cut of the text into pieces
        deltas += ts.feed(text[i:i + 3])
    deltas += ts.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    want = plan.message(text)
    assert content == (want["content"] or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(c["function"]["name"], c["function"]["arguments"]) for c in want.get("tool_calls", [])]


@pytest.mark.parametrize("glm4", [False, True])
def test_required_grammar_accepts_exactly_well_formed_calls(smollm2_tokenizer_meta, glm4):
    from openautoglm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(smollm2_tokenizer_meta)
    vocab = Vocab.of(tok, tok.vocab_size, tok.eog_ids)
    g = tool_grammar(TOOLS, "required", glm4=glm4, tokenizer=tok)

    def accepts(text):
        m = Constraint(g, vocab).matcher
        ids = tok.encode(text, add_special_tokens=False)
        return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()

    if glm4:
        good, bad = 'add\n{"a": 1, "b": 2}', ['add\n{"a": 1}', 'sub\n{"a": 1, "b": 2}', 'add {"a": 1, "b": 2}']
    else:
        good = f'{OPEN}\n{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\n{CLOSE}'
        bad = [f'{OPEN}\n{{"name": "add", "arguments": {{"a": 1}}}}\n{CLOSE}',  # a required argument missing
               f'{OPEN}\n{{"name": "sub", "arguments": {{"a": 1, "b": 2}}}}\n{CLOSE}',  # no such tool
               f'{OPEN}\n{{"name": "add", "arguments": {{"a": "1", "b": 2}}}}\n{CLOSE}',  # a string for a number
               'I will not call a tool.']
    assert accepts(good)
    for b in bad:
        assert not accepts(b), b
