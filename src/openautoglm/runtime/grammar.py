"""Grammar-constrained decoding: JSON schema, any JSON, a regex or a Lark grammar, through llguidance.

llguidance (the engine llama.cpp and vLLM use) compiles a grammar against the tokenizer's vocabulary and, at
each step, gives the set of tokens that keep the output a prefix of a sentence of the grammar, as a bitmask of
ceil(V / 32) int32 words per row. Why llguidance over xgrammar (both measured, ``benchmarks/grammar_engines.py``):
a schema compiles in ~1.5 ms against 6-70 ms (SmolLM2 / Qwen vocabularies), which matters when every request
brings its own tool schemas; it names the schema keywords it cannot enforce (we answer 400 with them, never a
silent ignore) and it takes Lark grammars. xgrammar's masks are faster (3-7 us against 40-55 us median), but
either is far under one decode step and the mask is computed while the forward runs.

How a decode step uses it (``Generation`` and the server's ``Scheduler``): before the forward, the masks of
the constrained rows are computed on a worker thread (llguidance drops the GIL), the forward runs meanwhile,
then each constrained row's disallowed logits are set to -inf before sampling, and the sampled token advances
that row's matcher. Free rows of the same batch are untouched, so constrained and free requests share a step.

Closing within the budget: a small model can loop inside a grammar (an array of objects that nest forever, a
string that never ends) and run out of tokens with the output open, which is as bad as invalid output. When a
constrained row has ``closing_reserve(max_tokens)`` tokens left, it closes what it has open: a JSON scanner over
the constrained text knows the innermost open thing (a string, an array, an object, or nothing), and the mask is
narrowed, in order of preference, to the allowed tokens that close it (made only of closing characters and
blanks, starting with ``"``, ``]`` or ``}``; end-of-sequence when nothing is open), else that end the current
value (``,``), else that open nothing (no ``[`` or ``{``). In a string that may not end yet (a format or a
pattern is unfinished: ``john_john_...`` of an e-mail) the next choices are the one-character separators of
formatted text, one at a time in the order ``@ . - : /``, which move such a string towards its end. Last come
the tokens that are not only blanks (JSON allows blanks between tokens: a model must not spend its reserve on
them). Where the grammar allows none of these the full mask applies.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import InvalidParameterError

KINDS = ("json_schema", "json", "regex", "lark")
# JSON whitespace between tokens: pretty-printing is allowed, an endless run of blanks is not (a small model
# would otherwise spend its whole budget on it and never close the object).
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


@dataclass(frozen=True)
class Grammar:
    """What the generated text must match. Build it with the class methods; it is validated on creation."""

    kind: str
    source: str  # the schema as JSON text, the regex, or the Lark grammar
    #: Lazy: free output until the text contains one of these; the grammar then matches what follows.
    triggers: tuple[str, ...] = ()
    #: With triggers: after the grammar completes once, end the output (no second match).
    once: bool = False
    #: Lazy, at the start of the output only: once the output so far matches this regex (``re.match``, within
    #: its first LEAD_WINDOW characters), ``lead_grammar`` constrains the output from the end of the match (the
    #: text already written past it is fed to it), and the output ends when it completes.
    lead: str = ""
    lead_grammar: "Grammar | None" = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidParameterError(f"unknown grammar kind {self.kind!r} (one of {', '.join(KINDS)})")
        object.__setattr__(self, "triggers", tuple(self.triggers))
        if any(not isinstance(t, str) or not t for t in self.triggers):
            raise InvalidParameterError("grammar triggers must be non-empty strings")
        if bool(self.lead) != (self.lead_grammar is not None):
            raise InvalidParameterError("a grammar's lead and lead_grammar go together")
        if self.lead:
            try:
                _lead_re(self.lead)
            except re.error as e:
                raise InvalidParameterError(f"invalid lead pattern: {e}") from None
        compiled(self)  # raise now, on the caller's thread, for a bad schema or grammar

    @classmethod
    def json_schema(cls, schema: dict | str, **kw) -> "Grammar":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise InvalidParameterError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidParameterError("a JSON schema must be an object (or true / false)")
        return cls("json_schema", json.dumps(schema), **kw)  # key order kept: it is the properties' order

    @classmethod
    def json(cls, **kw) -> "Grammar":
        """Any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
        return cls("json", json.dumps({"type": "object"}), **kw)

    @classmethod
    def regex(cls, pattern: str, **kw) -> "Grammar":
        return cls("regex", pattern, **kw)

    @classmethod
    def lark(cls, grammar: str, **kw) -> "Grammar":
        return cls("lark", grammar, **kw)


def _llg():
    try:
        import llguidance
    except ImportError as e:  # a dependency, but keep the message useful if it was removed by hand
        raise InvalidParameterError("grammar-constrained decoding needs llguidance: pip install llguidance") from e
    return llguidance


@lru_cache(maxsize=256)
def compiled(g: Grammar) -> str:
    """The llguidance grammar of ``g``; InvalidParameterError naming what it cannot enforce."""
    llg = _llg()
    M = llg.LLMatcher
    if g.kind in ("json_schema", "json"):
        try:
            text = M.grammar_from_json_schema(g.source, defaults=dict(JSON_OPTIONS))
        except ValueError as e:
            raise InvalidParameterError(f"invalid JSON schema: {e}") from None
    elif g.kind == "regex":
        text = M.grammar_from_regex(g.source)
    else:
        text = M.grammar_from_lark(g.source)
    err = M.validate_grammar(text)
    if err:
        what = {"json_schema": "JSON schema", "json": "JSON", "regex": "regex", "lark": "Lark grammar"}[g.kind]
        raise InvalidParameterError(f"the {what} cannot be enforced: {_one_line(err)}")
    return text


@lru_cache(maxsize=64)
def _lead_re(pattern: str) -> re.Pattern:
    return re.compile(pattern)


LEAD_WINDOW = 64  # characters of output within which a lead may still match


def _one_line(s: str, n: int = 300) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def closing_reserve(max_tokens: int) -> int:
    """Tokens before the end of the budget at which a constrained row starts closing what it has open."""
    return min(max(8, max_tokens // 4), 256)


class Vocab:
    """llguidance's view of one tokenizer, for logits of width ``n_vocab``; cached on the tokenizer."""

    def __init__(self, tokenizer, n_vocab: int, eos_ids):
        llg = _llg()
        self.tokenizer, self.n_vocab = tokenizer, n_vocab
        self.eos_ids = sorted(eos_ids)
        self._closers = None
        self.words = (n_vocab + 31) // 32
        self.lltok = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=sorted(eos_ids))
        self.executor = llg.LLExecutor(num_threads=1)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")

    @staticmethod
    def of(tokenizer, n_vocab: int, eos_ids) -> "Vocab":
        key = (n_vocab, tuple(sorted(eos_ids)))
        with _vocab_lock:
            cache = tokenizer.__dict__.setdefault("_grammar_vocabs", {})
            if key not in cache:
                cache[key] = Vocab(tokenizer, n_vocab, eos_ids)
            return cache[key]


    def closing_tiers(self, what: str | None) -> list[np.ndarray]:
        """(n_vocab,) bool masks, most preferred first: the tokens that close ``what`` (``"``, ``]`` or ``}``:
        text made only of closing characters and blanks, starting with it; end-of-sequence tokens for None);
        then in a string each one-character part separator in turn, elsewhere ``,`` and then the tokens that
        open nothing; last, any token that is not only blanks."""
        if self._closers is None:
            n = min(self.n_vocab, self.tokenizer.vocab_size)
            texts = [t.strip() for t in self.tokenizer.backend.decode_batch([[i] for i in range(n)],
                                                                          skip_special_tokens=True)]
            def mask(pred) -> np.ndarray:
                m = np.zeros(self.n_vocab, dtype=bool)
                m[:n] = [pred(t) for t in texts]
                return m

            by = {ch: mask(lambda t, ch=ch: bool(t) and t[0] == ch and set(t) <= _CLOSING_TEXT) for ch in _CLOSERS}
            eos = np.zeros(self.n_vocab, dtype=bool)
            eos[[i for i in self.eos_ids if i < self.n_vocab]] = True
            by[None] = eos
            sep = mask(lambda t: t == ",")
            flat = mask(lambda t: bool(t) and "[" not in t and "{" not in t)
            solid = mask(bool)
            parts = [mask(lambda t, ch=ch: t == ch) for ch in _PARTS]
            self._closers = by, sep, flat, parts, solid
        by, sep, flat, parts, solid = self._closers
        return [by[what], *parts, solid] if what == '"' else [by[what], sep, flat, solid]


_vocab_lock = threading.Lock()
_CLOSERS = '"]}'
_PARTS = "@.-:/"  # separators of formatted strings (e-mail, host, date, time, path), most decisive first
_CLOSING_TEXT = set(_CLOSERS) | set(" \n\t\r")


class JsonScan:
    """What is open at the end of a JSON text: a stack of ``[`` / ``{`` and whether a string is open."""

    def __init__(self):
        self.stack: list[str] = []
        self.in_str = self.escape = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_str:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"':
                self.in_str = True
            elif ch in "[{":
                self.stack.append(ch)
            elif ch in "]}" and self.stack:
                self.stack.pop()

    @property
    def innermost(self) -> str | None:
        """The character that closes the innermost open thing, or None when nothing is open."""
        if self.in_str:
            return '"'
        return {"[": "]", "{": "}"}[self.stack[-1]] if self.stack else None


class Constraint:
    """One row's grammar state: the matcher, and for a lazy grammar whether it has triggered."""

    def __init__(self, grammar: Grammar, vocab: Vocab):
        self.grammar, self.vocab = grammar, vocab
        self.matcher = None
        self.scanned = 0  # characters of the row's text already searched for a trigger
        self.completed = 0  # times the grammar matched to its end
        self.closing = False  # the row is near the end of its budget: close what is open
        self.scan, self.scanned_json = JsonScan(), 0  # what the constrained text has open; text scanned so far
        self.leading = bool(grammar.lead)  # the start of the output may still match the lead
        self.led = False  # the lead matched: lead_grammar is (or was) the constraint
        if not grammar.triggers and not grammar.lead:
            self._start()

    def _start(self, leftover: str = "", at: int = 0, grammar: Grammar | None = None) -> None:
        llg = _llg()
        self.scan, self.scanned_json = JsonScan(), at
        self.matcher = llg.LLMatcher(self.vocab.lltok, compiled(grammar or self.grammar), log_level=0)
        if self.matcher.is_error():
            raise InvalidParameterError(f"the grammar cannot be enforced: {_one_line(self.matcher.get_error())}")
        if leftover:  # text the trigger's token carried past the trigger
            self.matcher.consume_tokens(self.vocab.lltok.tokenize_str(leftover))

    @property
    def active(self) -> bool:
        return self.matcher is not None and not self.matcher.is_error()

    def advance(self, token_id: int, text: str) -> bool:
        """The row sampled ``token_id`` and its text is now ``text``. True when the output must end here (the
        grammar is complete and allows nothing more, or a ``once`` lazy grammar completed)."""
        if self.matcher is not None:
            self.matcher.consume_token(token_id)
            self.scan.feed(text[self.scanned_json:])
            self.scanned_json = len(text)
            if self.matcher.is_error():
                self.matcher = None  # cannot happen under the mask; never leave a row stuck on a dead matcher
                return False
            if not self.matcher.is_stopped():
                return False
            self.completed += 1
            self.matcher = None
            self.scanned = len(text)
            return not self.grammar.triggers or self.grammar.once or self.led
        if self.leading and not self.completed:
            m = _lead_re(self.grammar.lead).match(text)
            if m:
                self.leading, self.led = False, True
                self._start(text[m.end():], m.end(), self.grammar.lead_grammar)
                self.scanned = len(text)
                return False
            self.leading = len(text) <= LEAD_WINDOW
        if self.grammar.triggers and not (self.grammar.once and self.completed):
            for t in self.grammar.triggers:
                i = text.find(t, max(0, self.scanned - len(t) + 1))
                if i != -1:
                    self._start(text[i + len(t):], i + len(t))
                    break
            self.scanned = len(text)
        return False


def fill_masks(vocab: Vocab, rows: list[tuple[Constraint, int]], out: torch.Tensor) -> None:
    """Write each active constraint's allowed-token bitmask into row ``i`` of ``out`` (B, words) int32."""
    vocab.executor.unsafe_compute_mask_ptr([(c.matcher, i) for c, i in rows], out.data_ptr(), vocab.words * 4,
                                           out.shape[0])


class MaskJob:
    """The masks of one step, computed on the grammar thread while the caller runs the forward."""

    def __init__(self, constraints: list[Constraint | None]):
        self.rows = [(c, i) for i, c in enumerate(constraints) if c is not None and c.active]
        self.future: Future | None = None
        if self.rows:
            vocab = self.rows[0][0].vocab
            self.bits = torch.empty(len(constraints), vocab.words, dtype=torch.int32)
            self.future = vocab.pool.submit(fill_masks, vocab, self.rows, self.bits)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, V) with the disallowed tokens of constrained rows at -inf, in place (the logits of a
        step are consumed by its sampling alone) on host float32, else on a copy. numpy on one thread: torch's
        small masked ops wake its thread pool, which costs more than the work on a loaded 2-core machine."""
        if self.future is None:
            return logits
        self.future.result()
        idx = [i for _, i in self.rows]
        V = logits.shape[-1]
        bits = self.bits.numpy() if len(idx) == len(self.bits) else self.bits[idx].numpy()
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :V].view(bool)
        host = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
        out = logits if host else logits.float().cpu().contiguous()
        arr = out.numpy()
        for k, (c, i) in enumerate(self.rows):
            ok = allowed[k]
            if c.closing:
                for tier in c.vocab.closing_tiers(c.scan.innermost):
                    narrowed = ok & tier[:V]
                    if narrowed.any():
                        ok = narrowed
                        break
            row = arr[i]
            if 2 * np.count_nonzero(ok) < V:  # few allowed (JSON structure): keep those
                keep = np.flatnonzero(ok)
                vals = row[keep]
                row.fill(-np.inf)
                row[keep] = vals
            else:  # few disallowed (inside a string)
                row[np.flatnonzero(~ok)] = -np.inf
        return out if host else out.to(device=logits.device)


def constraint_for(params, tokenizer, n_vocab: int, eos_ids) -> Constraint | None:
    """A fresh constraint for a request with these SamplingParams, or None when it has no grammar."""
    g = getattr(params, "grammar", None)
    return None if g is None else Constraint(g, Vocab.of(tokenizer, n_vocab, eos_ids))
