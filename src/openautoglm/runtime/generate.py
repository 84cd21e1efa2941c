"""The generate loop: batched prefill, batched decode over a static KV cache, sampling, stopping, streaming.

A batch of prompts of different lengths is right-padded for one prefill; each row then decodes at its own
position (the cache keeps per-row positions, see ``kv_cache.py``), so a batch gives the same tokens as running
each prompt alone. Text is produced incrementally without splitting multi-byte characters (the
prefix/read-offset method of TGI and vLLM), and text that might be the start of a stop string is held back
until it is known not to be one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import ContextLengthExceededError, InvalidParameterError
from .grammar import MaskJob, closing_reserve, constraint_for
from .runner import ModelRunner
from .sampler import SamplingParams, make_generator, sample


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never end inside a character."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read])
        new_text = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :]


@dataclass
class Sequence:
    """One request's state during generation."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    detok: IncrementalDetokenizer
    generator: torch.Generator
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # text decoded so far (before stop truncation)
    emitted: int = 0  # characters of ``text`` already yielded
    finish_reason: str | None = None
    constraint: object = None  # runtime.grammar.Constraint of a request with a grammar

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.out_ids


@dataclass
class StreamEvent:
    """A piece of output for row ``index``; ``finish_reason`` is set on the row's last event."""

    index: int
    text: str
    token_id: int | None
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _stop_cut(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Index where the first stop string occurs in text (searching from ``start``), or None."""
    best = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class Generation:
    """One batched generation. Iterate it for :class:`StreamEvent`; ``sequences`` holds the per-row state."""

    def __init__(self, model, tokenizer, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
                 eos_ids: set[int] | None = None, max_context: int | None = None):
        """``model``: a :class:`ModelRunner` (an engine's: its planned cache, compiled step and length buckets), or
        a model, run eagerly over a cache of its own. On a runner whose planned cache's row 0 still holds the
        previous generation's tokens, a single prompt that starts with some of them prefills only the rest (a
        multi-turn chat or an agent re-reads nothing), and the record is updated for the next one."""
        self.runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
        model = self.runner.model
        self.reused = 0  # prompt tokens whose keys and values came from the session
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts) or not prompts:
            raise InvalidParameterError("give one SamplingParams per prompt, and at least one prompt")
        cfg = model.config
        ctx = max_context or cfg.max_position_embeddings
        self.eos_ids = set(eos_ids if eos_ids is not None else cfg.eos_token_id)
        self.sequences: list[Sequence] = []
        for ids, p in zip(prompts, params):
            if not ids:
                raise InvalidParameterError("the prompt is empty")
            if len(ids) >= ctx:
                raise ContextLengthExceededError(
                    f"the prompt has {len(ids)} tokens but the context window is {ctx}; shorten the prompt"
                )
            self.sequences.append(Sequence(list(ids), p, min(p.max_tokens, ctx - len(ids)),
                                           IncrementalDetokenizer(tokenizer), make_generator(p.seed),
                                           constraint=constraint_for(p, tokenizer, cfg.vocab_size, self.eos_ids)))

    def __iter__(self) -> Iterator[StreamEvent]:
        runner, seqs = self.runner, self.sequences
        B = len(seqs)
        lens = torch.tensor([len(s.prompt_ids) for s in seqs])
        T = int(lens.max())
        need = max(len(s.prompt_ids) + s.max_new for s in seqs)
        cached = runner.claim(B, need)
        k = 0
        if cached and B == 1:  # reuse the common prefix, leaving at least one prompt token to prefill
            p = seqs[0].prompt_ids
            n = min(len(cached), len(p) - 1)
            while k < n and cached[k] == p[k]:
                k += 1
        self.reused = k
        lens = lens - k
        T -= k
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s.prompt_ids) - k] = torch.tensor(s.prompt_ids[k:])
        positions = torch.arange(k, k + T).expand(B, T)
        params = [s.params for s in seqs]
        gens = [s.generator for s in seqs]
        penalized = any(p.repetition_penalty != 1 for p in params)

        with torch.inference_mode():
            masks = MaskJob([s.constraint for s in seqs])  # computed while the forward runs
            logits = runner.prefill(ids, positions, logits_at=lens - 1)
            pos = lens + k  # next write position per row
            while True:
                logits = masks.apply(logits)
                next_ids = sample(logits, params, gens, [s.history for s in seqs] if penalized else None)
                for b, s in enumerate(seqs):
                    if s.finish_reason is None:
                        tok, n = int(next_ids[b]), len(s.out_ids)
                        piece = advance(s, tok, self.eos_ids)
                        yield StreamEvent(b, piece, tok if len(s.out_ids) > n else None, s.finish_reason)
                if all(s.finish_reason is not None for s in seqs):
                    if B == 1:  # the last token was sampled, never fed
                        runner.keep(seqs[0].prompt_ids + seqs[0].out_ids[:-1])
                    return
                # finished rows keep running on their last position (no cache growth): the batch shape stays
                # static and the live rows are unaffected
                done = [s.finish_reason is not None for s in seqs]
                step_pos = torch.where(torch.tensor(done), pos - 1, pos) if any(done) else pos
                pos = step_pos + 1
                masks = MaskJob([s.constraint if s.finish_reason is None else None for s in seqs])
                # (one attended length, the whole generation's, so a compiled step sees one shape throughout)
                logits = runner.decode(next_ids, step_pos, context=need)


def generate(model, tokenizer, prompts, params, eos_ids=None, max_context=None, **kw) -> list[GenerationResult]:
    """Run a batch to the end; one :class:`GenerationResult` per prompt."""
    g = Generation(model, tokenizer, prompts, params, eos_ids, max_context, **kw)
    for _ in g:
        pass
    return [GenerationResult(s.text, s.out_ids, s.finish_reason, len(s.prompt_ids), len(s.out_ids))
            for s in g.sequences]


def advance(s, tok: int, eos_ids: set[int]) -> str:
    """Apply one sampled token to sequence ``s`` and return the text it releases.

    An end-of-sequence or stop token ends ``s`` without joining its output; any other token is appended,
    decoded, checked against the stop strings and ``max_new``. ``s.finish_reason`` is set when ``s`` ends.
    Shared by the batch loop here and the server's scheduler.
    """
    p = s.params
    if (tok in eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
        s.finish_reason = "stop"
        s.text += s.detok.flush()
        return _release(s, final=True)
    s.out_ids.append(tok)
    start = len(s.text)
    s.text += s.detok.push(tok)
    c = s.constraint
    if c is not None and c.advance(tok, s.text):  # the grammar is complete and allows nothing more
        s.finish_reason = "stop"
        s.text += s.detok.flush()
    elif len(s.out_ids) >= s.max_new:
        s.finish_reason = "length"
        s.text += s.detok.flush()
    if c is not None and s.max_new - len(s.out_ids) <= closing_reserve(s.max_new):
        c.closing = True
    if p.stop:
        cut = _stop_cut(s.text, p.stop, start)
        if cut is not None:
            s.text, s.finish_reason = s.text[:cut], "stop"
    return _release(s, final=s.finish_reason is not None)


def _release(s: Sequence, final: bool) -> str:
    end = len(s.text) if final or not s.params.stop else len(s.text) - _held_back(s.text, s.params.stop)
    piece = s.text[s.emitted : end]
    s.emitted = max(s.emitted, end)
    return piece
