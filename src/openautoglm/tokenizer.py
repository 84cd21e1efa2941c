"""Tokenizers from ``tokenizer.json`` or from GGUF metadata, and chat templates.

A GGUF carries a byte-level BPE vocabulary and merges (``tokenizer.ggml.*``) and names its pre-tokenizer
(``tokenizer.ggml.pre``). We rebuild it as an HF ``tokenizers`` BPE with the split rules llama.cpp's
``llama-vocab.cpp`` uses for that pre-tokenizer, mark control tokens special, and honour
``add_bos_token``. Chat templates are rendered with jinja2 in the sandboxed environment and with the helpers
(``raise_exception``, ``tojson``, ``strftime_now``) that transformers' ``apply_chat_template`` provides.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .errors import InvalidModelError, InvalidParameterError, corrupt_on_error

# Splits llama.cpp applies before byte-level BPE, per tokenizer.ggml.pre (llama-vocab.cpp).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre name -> (split digits one by one first, main regex or None for GPT-2's built-in one)
PRE_TOKENIZERS = {
    "default": (False, None), "gpt2": (False, None), "mpt": (False, None), "olmo": (False, None),
    "smollm": (True, None), "starcoder": (True, None), "refact": (True, None), "command-r": (True, None),
    "codeshell": (True, None), "exaone": (True, None),
    "llama3": (False, _LLAMA3_SPLIT), "llama-v3": (False, _LLAMA3_SPLIT), "llama-bpe": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT), "dbrx": (False, _LLAMA3_SPLIT), "falcon3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT), "deepseek-r1-qwen": (False, _QWEN2_SPLIT), "stablelm2": (False, _QWEN2_SPLIT),
    "chatglm-bpe": (False, _LLAMA3_SPLIT), "glm4": (False, _LLAMA3_SPLIT),
}

# Tokens that end a turn in common chat formats; llama.cpp treats these as end-of-generation when present.
EOG_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "</s>",
              "<end_of_turn>", "<|user|>", "<|observation|>")

CONTROL, USER_DEFINED = 3, 4


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Text <-> token ids, special tokens, and the chat template."""

    def __init__(self, backend, bos_token: str | None, eos_token: str | None, chat_template: str | None,
                 eog_ids: set[int]):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.eog_ids = set(eog_ids) | ({self.eos_id} if self.eos_id is not None else set())

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` as transformers' ``apply_chat_template(tokenize=False)`` does."""
        if not self.chat_template:
            raise InvalidParameterError("this model has no chat template; pass a plain prompt instead of messages")
        validate_messages(messages)
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added on top (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        with corrupt_on_error("the GGUF tokenizer metadata"):
            return cls._from_gguf_metadata(meta)

    @classmethod
    def _from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE

        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise InvalidModelError(
                f"GGUF tokenizer model {kind!r} is not supported yet (supported: 'gpt2' byte-level BPE)"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [])
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        spell = _byte_alphabet()
        alphabet = set(spell.values())
        vocab = {}
        for i, t in enumerate(tokens):
            key = t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))
            vocab.setdefault(key, i)
        bk = HFTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise InvalidModelError(
                f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        digits, regex = PRE_TOKENIZERS[pre]
        steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        if regex is None:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        bk.pre_tokenizer = pre_tokenizers.Sequence(steps)
        bk.decoder = decoders.ByteLevel()
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == CONTROL and set(t) <= alphabet]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
        if control:
            bk.add_special_tokens(control)
        if user:
            bk.add_tokens(user)

        def tok(key):
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos, eos = tok("bos"), tok("eos")
        if meta.get("tokenizer.ggml.add_bos_token") and bos:
            bk.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.get(bos, tokens.index(bos)))]
            )
        eog = {i for i, t in enumerate(tokens) if t in EOG_TOKENS and (not types or types[i] == CONTROL)}
        return cls(bk, bos, eos, meta.get("tokenizer.chat_template"), eog)

    @classmethod
    def from_hf_dir(cls, path: str | Path, eos_token_ids: tuple[int, ...] = ()) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise InvalidModelError(f"{path} has no tokenizer.json")
        with corrupt_on_error(f"the tokenizer of {path}"):
            return cls._from_hf_dir(path, eos_token_ids)

    @classmethod
    def _from_hf_dir(cls, path: Path, eos_token_ids: tuple[int, ...]) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tj = path / "tokenizer.json"
        bk = HFTokenizer.from_file(str(tj))
        conf = {}
        if (path / "tokenizer_config.json").is_file():
            conf = json.loads((path / "tokenizer_config.json").read_text())

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        template = conf.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        eog = set(eos_token_ids)
        gen = path / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eog |= set(e if isinstance(e, list) else [e] if e is not None else [])
        return cls(bk, tok_str(conf.get("bos_token")), tok_str(conf.get("eos_token")), template, eog)


def validate_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), (str, list, type(None))):
            raise InvalidParameterError("each message must be a dict with a 'role' and a string 'content'")


def _raise(msg):
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        raise InvalidParameterError(f"the chat template rejected the messages: {e}") from None
