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


def test_parse_untagged_calls_at_the_start():
    """A reply that is only calls, in ```json fences or bare (Qwen2.5-Coder's habit), is calls; JSON that starts
    later, trails text, or names an undeclared tool stays content."""
    fenced = '```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```'
    two = fenced + '\n\n```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```\n'
    for text, want in [(fenced, [("add", {"a": 1, "b": 2})]), ("  " + fenced.replace("json", "", 1), [("add", {"a": 1, "b": 2})]),
                       ('{"name": "add", "arguments": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
                       (two, [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Rome"})])]:
        content, calls = parse(text, TOOLS)
        assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                    for c in calls] == want, text
    for text in ['Here: {"name": "add", "arguments": {"a": 1, "b": 2}}', fenced + " and that is it",
                 fenced.replace('"add"', '"sub"'), '{"name": "add", "arguments": {"a": 1, "b": 2}', '{"city": "Rome"}']:
        assert parse(text, TOOLS) == (text, []), text


@pytest.mark.parametrize("text", [
    '```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```',
    '{"name": "get_weather", "arguments": {"city": "Rome"}}',
    '```python\nprint(1)\n```',
    '{"name": "sub", "arguments": {}} is not a tool',
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


@pytest.mark.parametrize("glm4", [False, True])
def test_arguments_a_tool_does_not_declare_are_refused_unless_it_allows_them(smollm2_tokenizer_meta, glm4):
    """As llama.cpp reads a tool's parameters: an object schema that lists properties and says nothing about others
    takes only those (nested objects too); ``additionalProperties: true`` keeps it open."""
    from openautoglm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(smollm2_tokenizer_meta)
    vocab = Vocab.of(tok, tok.vocab_size, tok.eog_ids)
    place = {"type": "object", "properties": {"city": {"type": "string"}}}

    def accepts(tools, args):
        g = tool_grammar(validate_tools(tools), "required", glm4=glm4, tokenizer=tok)
        text = f'find\n{json.dumps(args)}' if glm4 else \
            f'{OPEN}\n{json.dumps({"name": "find", "arguments": args})}\n{CLOSE}'
        m = Constraint(g, vocab).matcher
        ids = tok.encode(text, add_special_tokens=False)
        return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()

    closed_tool = [{"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "near": place}, "required": ["q"]}}}]
    open_tool = [{"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"], "additionalProperties": True}}}]
    assert accepts(closed_tool, {"q": "tea", "near": {"city": "Oslo"}})
    assert not accepts(closed_tool, {"q": "tea", "//": "a comment"})
    assert not accepts(closed_tool, {"q": "tea", "near": {"city": "Oslo", "zip": "0150"}})
    assert accepts(open_tool, {"q": "tea", "//": "a comment"})


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_grammar_takes_over_a_reply_that_starts_as_a_call(smollm2_tokenizer_meta, parallel):
    """``auto``: free text, unless the reply starts as a call object (fenced or bare) to a declared tool; from
    its name on the call grammar constrains it (a declared tool, schema-valid arguments, the fence closed) and the reply ends
    with it. Replayed token by token through the Constraint, with the matcher as the oracle."""
    from openautoglm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_metadata(smollm2_tokenizer_meta)
    vocab = Vocab.of(tok, tok.vocab_size, tok.eog_ids)
    g = tool_grammar(TOOLS, "auto", parallel, tokenizer=tok)

    def walk(text):
        """(index of the token at which the constraint switched on or None, tokens the matcher refused,
        whether the reply was ended by the grammar)."""
        c, out, on, refused = Constraint(g, vocab), "", None, 0
        for k, t in enumerate(tok.encode(text, add_special_tokens=False)):
            if c.active:
                refused += not c.matcher.validate_tokens([t])
                if refused:
                    return on, refused, False
            out += tok.decode([t])
            if c.advance(t, out):
                return on, refused, True
            if c.active and on is None:
                on = k
        return on, refused, False

    call = '```json\n{\n  "name": "add",\n  "arguments": {"a": 1, "b": 2}\n}\n```'
    on, refused, ended = walk(call)
    assert on is not None and refused == 0 and ended is (not parallel)  # parallel: a second call may follow
    assert walk('{"name": "get_weather", "arguments": {"city": "Oslo"}}')[:2][1] == 0
    assert walk('{"name": "get_weather", "arguments": {"city": "Oslo"}}')[0] is not None
    for bad in [call.replace('"b": 2', '"b": "2"'), call.replace('"a": 1, ', ''), call.replace("}\n```", "} trailing")]:
        on, refused, _ = walk(bad)
        assert on is not None and refused == 1, bad
    # a call to a tool that does not exist stays free text (the grammar would make it a call to a declared one)
    for free in [call.replace('"add"', '"sub"'), call.replace('"add"', '"adder"'), 'Sure: {"name": "add"}',
                 '```python\nprint({"name": 1})\n```', '{"city": 1}']:
        assert walk(free) == (None, 0, False), free
