"""OpenAI tool calling and structured output on top of the chat template and the grammar engine.

Prompt: tools go into the model's own chat template (``tools=`` as transformers passes them) when the template
uses them; a template without tool support (SmolLM2's) gets a generic system prompt that lists the tools as
JSON and asks for the Hermes/Qwen2.5 call format::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

History: an assistant message's ``tool_calls`` (OpenAI shape, arguments as a JSON string) are handed to the
template with the arguments parsed (templates render them with ``tojson``); ``role: tool`` messages are the
template's to render, or become ``<tool_response>`` user turns in the generic format.

Constraint (``runtime/grammar.py``): ``tool_choice="required"`` or a named tool: the whole reply is tool
calls, one or more (``parallel_tool_calls``), each's JSON an object ``{"name": <a declared tool>, "arguments":
<valid for that tool's parameters schema>}``, from the first token. ``"auto"``: free text until the model
writes ``<tool_call>``, then the call is constrained ("lazy grammar", as llama.cpp's server does). ``"none"``:
no constraint and no parsing. GLM-4 (its template ends a turn at ``<|observation|>``) writes a call as the
tool's name on one line and the arguments' JSON after it; it has its own grammar and parser.

Output: :func:`parse` splits the reply into content and OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid

from .errors import InvalidParameterError
from .runtime.grammar import JSON_OPTIONS, Grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# the start of a reply that is calls without the tags: blanks, then an optional ```json fence, then an object
# whose first key is "name" (the match ends before the fence, where the call grammar takes over)
_LEAD_HEAD = r'\s*(?=(?:```(?:json|JSON)?[ \t]*\n\s*)?\{\s*"name"\s*:'
_LEAD = re.compile(_LEAD_HEAD + ")")
_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WS = r"/[ \t\r\n]*/"

GENERIC_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def validate_tools(tools) -> list[dict]:
    """The tools in OpenAI's shape, checked; InvalidParameterError naming what is wrong."""
    if not isinstance(tools, list) or not tools:
        raise InvalidParameterError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    seen = set()
    out = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise InvalidParameterError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidParameterError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise InvalidParameterError(f"tools[{i}]: the tool name {name!r} is declared twice")
        seen.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidParameterError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": {**f, "parameters": params}})
    return out


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def resolve_choice(tools: list[dict] | None, choice) -> str | None:
    """``tool_choice`` as 'none' | 'auto' | 'required' | 'name:<tool>' (None: no tools)."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidParameterError("tool_choice needs tools")
        return None
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in tool_names(tools):
            raise InvalidParameterError(f"tool_choice names {name!r}, which is not among the tools")
        return "name:" + name
    raise InvalidParameterError("tool_choice must be 'none', 'auto', 'required' or "
                                "{'type': 'function', 'function': {'name': ...}}")


def closed(schema):
    """``schema`` with ``additionalProperties: false`` on every object schema that lists properties and says
    nothing about others, as llama.cpp's schema converter reads a tool's parameters: the grammar then refuses
    arguments the tool does not declare (BFCL irrelevance: Qwen2.5-Coder wrote a ``"//"`` comment key into a
    call). An explicit ``additionalProperties``, ``patternProperties`` or ``unevaluatedProperties`` is kept, and an
    object whose properties may come from elsewhere (``allOf``, ``$ref`` beside them) stays open; ``allOf``,
    ``not`` and ``if`` subschemas are left as written (closing them would change what they accept)."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
        if isinstance(schema.get(k), dict):
            out[k] = {n: closed(v) for n, v in schema[k].items()}
    keep = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref")
    if "properties" in schema and not any(k in schema for k in keep):
        out["additionalProperties"] = False
    return out


# keywords whose value is a schema or a list of schemas (the maps of schemas are walked in closed())
_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "then", "else", "additionalProperties")


def _call_schema(tools: list[dict]) -> dict:
    alts = [{"type": "object",
             "properties": {"name": {"const": t["function"]["name"]},
                            "arguments": closed(t["function"]["parameters"])},
             "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    return {**schema, "x-guidance": dict(JSON_OPTIONS)}


def is_glm4(template: str | None) -> bool:
    return bool(template) and "<|observation|>" in template


def _tag(tokenizer, text: str) -> str:
    """A tag in a Lark grammar: the vocabulary's own token when it has one (llguidance matches added tokens
    only as tokens, ``<[id]>``), else the literal text."""
    i = tokenizer.backend.token_to_id(text) if tokenizer is not None else None
    return f"<[{i}]>" if i is not None else json.dumps(text)


def lead_pattern(names: list[str]) -> str:
    """The lead of ``auto``'s call grammar: as ``_LEAD``, up to a declared tool's whole name. A call to a tool
    that does not exist stays content, as llama.cpp's trigger does: the grammar would otherwise turn a
    hallucinated call into a call to a declared tool (BFCL irrelevance, Qwen2.5-Coder-1.5B: 52% free, 8% with
    the lead at "name":)."""
    return _LEAD_HEAD + r'\s*"(?:' + "|".join(re.escape(n) for n in names) + ')")'


def tool_grammar(tools: list[dict], choice: str, parallel: bool = True, glm4: bool = False,
                 tokenizer=None) -> Grammar | None:
    """The constraint of a reply for ``choice`` (see :func:`resolve_choice`)."""
    if choice in (None, "none"):
        return None
    if choice.startswith("name:"):
        tools = [t for t in tools if t["function"]["name"] == choice[5:]]
    if glm4:  # name on its own line, then the arguments' JSON
        rules = [f'call{i}: "{t["function"]["name"]}\\n" args{i}\nargs{i}: %json '
                 + json.dumps({**closed(t["function"]["parameters"]), "x-guidance": dict(JSON_OPTIONS)})
                 for i, t in enumerate(tools)]
        start = "start: " + " | ".join(f"call{i}" for i in range(len(tools)))
        return Grammar.lark(start + "\n" + "\n".join(rules) + "\n")
    body = "body: %json " + json.dumps(_call_schema(tools)) + "\n"
    open_, close = _tag(tokenizer, OPEN), _tag(tokenizer, CLOSE)
    if choice == "auto":  # lazy: what follows the model's own <tool_call>; or a reply that starts as calls
        again = (lambda r: f" ({_WS} {r})*") if parallel else (lambda r: "")
        lead = Grammar.lark(f"start: fenced | bare\nfenced: fcall{again('fcall')}\n"
                            f'fcall: /```(json|JSON)?[ \\t]*\\n/ {_WS} body {_WS} "```"\n'
                            f"bare: body{again('body')}\n" + body)
        return Grammar.lark(f"start: {_WS} body {_WS} {close}\n" + body, triggers=(OPEN,), once=not parallel,
                            lead=lead_pattern(tool_names(tools)), lead_grammar=lead)
    more = ' ("\\n" call)*' if parallel and choice == "required" else ""  # a named tool: one call
    return Grammar.lark(f'start: call{more}\ncall: {open_} "\\n" body "\\n" {close}\n' + body)


def response_format_grammar(rf) -> Grammar | None:
    """OpenAI ``response_format``: text, json_object, json_schema (with ``strict`` or not: always enforced)."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidParameterError("response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return Grammar.json()
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
        raise InvalidParameterError("response_format.json_schema must be {'name': ..., 'schema': {...}}")
    return Grammar.json_schema(js.get("schema", {"type": "object"}))


def prepare_messages(messages: list[dict], tools: list[dict] | None, template: str | None) -> tuple[list[dict], dict]:
    """Messages and template keyword arguments for a chat with ``tools``: native when the template takes
    tools, else the generic system prompt; assistant tool calls and tool results made renderable."""
    native = bool(template) and "tools" in template
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            calls = [_history_call(c) for c in calls]
            if native:
                m["tool_calls"] = calls
            else:
                m.pop("tool_calls")
                text = "\n".join(f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})}\n{CLOSE}'
                                 for c in calls)
                m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "") + text)
        if m.get("role") == "tool" and not native:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if not tools:
        return out, {}
    if native:
        return out, {"tools": tools}
    listing = "\n".join(json.dumps(t) for t in tools)
    prompt = GENERIC_PROMPT.format(tools=listing)
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": (out[0].get("content") or "") + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


def _history_call(c) -> dict:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        raise InvalidParameterError("an assistant message's tool_calls must be [{'type': 'function', 'function': "
                                    "{'name': ..., 'arguments': ...}}]")
    f = c["function"]
    args = f.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise InvalidParameterError(f"tool call {f.get('name')!r}: arguments are not valid JSON") from None
    return {**c, "function": {"name": f.get("name"), "arguments": args}}


def new_call(name: str, arguments) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


def parse(text: str, tools: list[dict], glm4: bool = False) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a reply. A block that is not a well-formed call to a declared tool stays in
    the content, as text."""
    names = set(tool_names(tools))
    if glm4:
        head, _, rest = text.partition("\n")
        if head.strip() in names:
            try:
                args = json.loads(rest)
            except ValueError:
                args = None
            if isinstance(args, dict):
                return None, [new_call(head.strip(), args)]
        return (text or None), []
    lead = _lead_calls(text, names)
    if lead:
        return None, lead
    calls, content, pos = [], [], 0
    for m in re.finditer(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), text, re.S):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict):
            content.append(text[pos:m.start()])
            calls.append(new_call(obj["name"], obj.get("arguments", {})))
            pos = m.end()
    content.append(text[pos:])
    body = "".join(content).strip()
    return (body or None), calls


def _lead_calls(text: str, names: set[str]) -> list[dict] | None:
    """The calls of a reply that is only calls, fenced (```json ... ```) or bare JSON objects; else None."""
    if not _LEAD.match(text):
        return None
    t, pos, calls = text.strip(), 0, []
    fenced = t.startswith("```")
    dec = json.JSONDecoder()
    while pos < len(t):
        if fenced:
            m = _FENCE.match(t, pos)
            if not m:
                return None
            pos = m.end()
        try:
            obj, pos = dec.raw_decode(t, len(t) - len(t[pos:].lstrip()))
        except ValueError:
            return None
        if not (isinstance(obj, dict) and obj.get("name") in names and isinstance(obj.get("arguments", {}), dict)):
            return None
        calls.append(new_call(obj["name"], obj.get("arguments", {})))
        pos = len(t) - len(t[pos:].lstrip())
        if fenced:
            if not t.startswith("```", pos):
                return None
            pos = len(t) - len(t[pos + 3:].lstrip())
    return calls or None


def _may_lead(text: str) -> bool:
    """Whether a reply that starts with ``text`` may still turn out to start as calls (see _LEAD)."""
    t = text.lstrip()
    if t.startswith("```"):
        rest = t[3:]
        if any(w.startswith(rest) for w in ("json", "JSON")):
            return True
        rest = rest[4:] if rest[:4] in ("json", "JSON") else rest
        rest = rest.lstrip(" \t")
        if not rest:
            return True
        if rest[0] != "\n":
            return False
        t = rest[1:].lstrip()
    elif "```".startswith(t):
        return True
    if not t:
        return True
    if t[0] != "{":
        return False
    u = t[1:].lstrip()
    if len(u) <= len('"name"'):
        return '"name"'.startswith(u)
    return u.startswith('"name"') and not u[6:].strip()


def _raise(msg: str):
    raise InvalidParameterError(msg)


def _at(param: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except InvalidParameterError as e:
        e.param = getattr(e, "param", None) or param
        raise


class ChatPlan:
    """A chat request with tools and/or a response format, ready to generate: prompt ids and the grammar; and
    how to read the reply (:meth:`message`)."""

    def __init__(self, tokenizer, messages: list[dict], tools=None, tool_choice=None, parallel_tool_calls=True,
                 response_format=None):
        """InvalidParameterError for a bad argument, with ``param`` naming it (the server's 400 says which)."""
        self.tools = _at("tools", lambda: validate_tools(tools) if tools is not None else None)
        self.choice = _at("tool_choice", resolve_choice, self.tools, tool_choice)
        rf = _at("response_format", response_format_grammar, response_format)
        if rf is not None and self.choice not in (None, "none"):
            _at("response_format", _raise, "response_format with tools is supported only with tool_choice='none'")
        if not isinstance(parallel_tool_calls, bool):
            _at("parallel_tool_calls", _raise, "parallel_tool_calls must be true or false")
        self.glm4 = is_glm4(tokenizer.chat_template)
        msgs, kw = _at("messages", prepare_messages, messages, self.tools, tokenizer.chat_template)
        self.prompt_ids = _at("messages", tokenizer.encode_chat, msgs, **kw)
        self.grammar = rf if rf is not None else _at(
            "tools", lambda: tool_grammar(self.tools, self.choice, parallel_tool_calls, self.glm4, tokenizer)
            if self.tools else None)

    @property
    def calls_tools(self) -> bool:
        return self.choice not in (None, "none")

    def message(self, text: str) -> dict:
        """The assistant message in OpenAI's shape: ``content`` and, when it called tools, ``tool_calls``."""
        if not self.calls_tools:
            return {"role": "assistant", "content": text}
        content, calls = parse(text, self.tools, self.glm4)
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        return msg


class ToolStream:
    """Streams a reply as OpenAI chat deltas: content as it comes (holding back what may be the start of a
    ``<tool_call>``), and each tool call as one ``tool_calls`` delta when its block closes. GLM-4 replies, and
    replies that start as untagged calls (``_LEAD``), are held to the end (a call there is only known from the
    whole reply)."""

    def __init__(self, plan: ChatPlan):
        self.plan, self.buf, self.calls = plan, "", 0
        self.started, self.ws = False, ""  # content emitted yet; blanks held until more content follows
        self.lead = "text" if plan.glm4 else "maybe"  # the reply may start as untagged calls: held to the end

    def _content(self, text: str) -> list[dict]:
        """Content as :func:`parse` gives it: blanks at either end of the whole content dropped."""
        if not self.started:
            text = text.lstrip()
        core = text.rstrip()
        if not core:
            self.ws += text
            return []
        out = [{"content": self.ws + core}]
        self.started, self.ws = True, text[len(core):]
        return out

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        if self.lead == "maybe" and not _may_lead(self.buf):
            self.lead = "call" if _LEAD.match(self.buf) else "text"
        if self.plan.glm4 or self.lead != "text":
            return []
        out = []
        while True:
            i = self.buf.find(OPEN)
            if i == -1:
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if self.buf.endswith(OPEN[:k])), 0)
                if len(self.buf) > keep:
                    out += self._content(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                return out
            if i > 0:
                out += self._content(self.buf[:i])
                self.buf = self.buf[i:]
            j = self.buf.find(CLOSE)
            if j == -1:
                return out
            block, self.buf = self.buf[: j + len(CLOSE)], self.buf[j + len(CLOSE):]
            _, calls = parse(block, self.plan.tools)
            out += self._calls(calls) if calls else self._content(block)

    def _calls(self, calls: list[dict]) -> list[dict]:
        out = []
        for c in calls:
            out.append({"tool_calls": [{"index": self.calls, **c}]})
            self.calls += 1
        return out

    def finish(self) -> list[dict]:
        """Deltas for what is still held at the end of the reply."""
        rest, self.buf = self.buf, ""
        if not rest:
            return []
        if self.plan.glm4 or self.lead != "text":
            content, calls = parse(rest, self.plan.tools, glm4=self.plan.glm4)
            if self.lead != "text" and not calls:  # not calls after all: the text, as parse leaves it
                self.lead = "text"
                self.buf = rest
                return self.feed("") + self.finish()
            return self._calls(calls) if calls else [{"content": content}] if content else []
        return self._content(rest)
