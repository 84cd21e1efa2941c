"""``openautoglm eval``: perplexity and KL divergence against a reference model, as llama.cpp measures its
quant types (``llama-perplexity --kl-divergence``).

The text is tokenized, its first N tokens split into non-overlapping windows of C tokens, and every position
of a window is scored from its context within that window. Against the reference we report the mean and 99th
percentile of the per-token KL(reference || candidate) and how often both pick the same top-1 token. The
default reference is the same model unquantized: for a GGUF, its weights dequantized to float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from ..progress import Progress


class OursScorer:
    """Logits from our runtime (a loaded Engine), optionally cast to bf16. ``decode``: every position as generation
    computes it, one token a step through the decode path (at O2/O3 the compiled step and its kernel choices,
    which a whole-window forward, a prefill, never runs), the KV cache filled by the steps before."""

    def __init__(self, engine, decode: bool = False):
        self.engine = engine
        self.decode = decode
        self.label = f"openautoglm {engine.dtype} {Path(str(engine.model_path)).name}"

    def weight_bytes(self) -> int:
        """Bytes of the weights on disk (the checkpoint's tensors), as llama.cpp reports its model size."""
        return sum(self.engine.checkpoint.weight_bytes_by_storage().values())

    def runtime_weight_bytes(self) -> int:
        return sum(self.engine.info()["runtime_weight_bytes"].values())

    def logits(self, ids: list[int]) -> torch.Tensor:
        if self.decode:
            return self._decode_logits(ids)
        with torch.inference_mode():
            return self.engine.model(torch.tensor([ids]))[0].float()

    def _decode_logits(self, ids: list[int]) -> torch.Tensor:
        """Each position's logits from a decode step over the cache, as generation runs them (the engine's runner:
        its planned cache and compiled step when the text fits, at generation's attended length)."""
        runner, n = self.engine.model_runner(), len(ids)
        runner.claim(1, n)
        out = []
        for t, tok in enumerate(ids):
            out.append(runner.decode(torch.tensor([tok]), torch.tensor([t]), context=n)[0].float())
        return torch.stack(out)


class LlamaCppScorer:
    """Logits from llama.cpp (llama-cpp-python) on a GGUF file: its own kernels and quantized dot products."""

    def __init__(self, path: str | Path, ctx: int, threads: int | None = None, decode: bool = False):
        try:
            import llama_cpp
        except ImportError:
            raise InvalidParameterError("llama-cpp-python is not installed (make install-peers)") from None
        import os

        self.path = Path(path)
        t = threads or os.cpu_count()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                                   n_threads=t, n_threads_batch=t, verbose=False)
        self._size = int(llama_cpp.llama_model_size(self.llm.model))
        self.label = f"llama.cpp {self.path.name}" + (" decode" if decode else "")
        self.decode = decode

    def weight_bytes(self) -> int:
        return self._size

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        if self.decode:  # one token a step: its decode path
            for tok in ids:
                self.llm.eval([tok])
        else:
            self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy()).float()


@dataclass
class EvalResult:
    model: str
    reference: str
    ppl: float
    ppl_reference: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    tokens: int
    windows: int
    ctx: int
    weight_bytes: int  # the candidate's weights on disk
    bits_per_weight: float  # 8 * weight_bytes / the reference's parameter count
    runtime_weight_bytes: int | None = None  # as held in memory while scoring (ours only)

    def to_dict(self) -> dict:
        return asdict(self)


def windows(tokens: list[int], n_tokens: int, ctx: int) -> list[list[int]]:
    if ctx < 2:
        raise InvalidParameterError("--ctx must be at least 2")
    toks = tokens[:n_tokens]
    n = len(toks) // ctx
    if n == 0:
        raise InvalidParameterError(f"the text has {len(toks)} tokens, fewer than one window of {ctx}")
    return [toks[i * ctx : (i + 1) * ctx] for i in range(n)]


def evaluate(candidate, reference, tokens: list[int], n_tokens: int = 2048, ctx: int = 512,
             n_weights: int | None = None, progress: bool = True) -> EvalResult:
    """Score ``candidate`` against ``reference`` (both have ``logits(ids) -> (T, V)``)."""
    wins = windows(tokens, n_tokens, ctx)
    nll_c, nll_r, klds, agree = [], [], [], 0
    with Progress("eval", total=len(wins), unit=" windows", enabled=progress) as pb:
        for w in wins:
            target = torch.tensor(w[1:])
            lc = torch.log_softmax(candidate.logits(w)[:-1].double(), -1)  # (C-1, V)
            lr = lc if reference is candidate else torch.log_softmax(reference.logits(w)[:-1].double(), -1)
            nll_c.append(-lc.gather(1, target[:, None])[:, 0])
            nll_r.append(-lr.gather(1, target[:, None])[:, 0])
            klds.append((lr.exp() * (lr - lc)).sum(-1).clamp_min(0))
            agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
            pb.update()
    nc, nr, kl = torch.cat(nll_c), torch.cat(nll_r), torch.cat(klds)
    wb = candidate.weight_bytes()
    return EvalResult(
        model=candidate.label, reference=reference.label,
        ppl=math.exp(float(nc.mean())), ppl_reference=math.exp(float(nr.mean())),
        kld_mean=float(kl.mean()), kld_p99=float(torch.quantile(kl, 0.99)), kld_max=float(kl.max()),
        top1_agreement=agree / kl.numel(), tokens=int(kl.numel()), windows=len(wins), ctx=ctx,
        weight_bytes=wb, bits_per_weight=8 * wb / n_weights if n_weights else float("nan"),
        runtime_weight_bytes=candidate.runtime_weight_bytes() if hasattr(candidate, "runtime_weight_bytes") else None,
    )


def count_weights(model) -> int:
    """Parameters of the model, tied ones counted once (the denominator of bits per weight)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def quantized_source(model: str) -> str | None:
    """The model a quantized artifact was made from (its default reference), or None for other models."""
    import json

    from ..errors import ModelNotFoundError

    cfg = Path(str(model)) / "config.json"
    if not cfg.is_file():
        return None
    q = json.loads(cfg.read_text()).get("quantization")
    if not q:
        return None
    src = q.get("source")
    if not src or not Path(src).exists():
        raise ModelNotFoundError(f"{model} was quantized from {src}, which is not here; pass --reference")
    return src


def run_eval(model: str, reference: str | None = None, text_file: str | None = None, n_tokens: int = 2048,
             ctx: int = 512, dtype: str = "fp32", peer: str | None = None, progress: bool = True,
             opt: str = "O0", decode: bool = False) -> EvalResult:
    """``opt``: the optimize level the candidate is compiled at (its passes and O3's kernel choices then score
    every window, as a prefill runs them); the reference is always O0 fp32. ``decode``: the candidate computes
    every position one token a step, as generation does (the decode kernels: O3 may choose other kernels there)."""
    from ..data import evaluation_text
    from ..engine import DTYPES, Engine, resolve_level
    from ..errors import ModelNotFoundError

    opt = resolve_level(opt)
    if dtype not in DTYPES:
        raise InvalidParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if n_tokens < ctx:
        raise InvalidParameterError(f"--tokens ({n_tokens}) must be at least --ctx ({ctx})")
    if reference is None and peer is None:
        reference = quantized_source(model)
    ref_engine = Engine(model=reference or model, progress=progress, gguf_weights="float")
    if text_file:
        p = Path(text_file)
        if not p.is_file():
            raise ModelNotFoundError(f"text file not found: {text_file}")
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        text = evaluation_text()
    tokens = ref_engine.tokenizer.encode(text, add_special_tokens=False)
    if ctx > ref_engine.config.max_position_embeddings:
        raise InvalidParameterError(f"--ctx {ctx} exceeds the model's context ({ref_engine.config.max_position_embeddings})")
    reference_scorer = OursScorer(ref_engine)
    n_weights = count_weights(ref_engine.model)
    if peer == "llama.cpp":
        from ..hub import resolve

        path = Path(ref_engine.model_path if reference is None else resolve(model))
        if not (path.is_file() and path.suffix.lower() == ".gguf"):
            raise InvalidParameterError(f"--peer llama.cpp scores a GGUF file, and {model} is not one")
        cand = LlamaCppScorer(path, ctx, decode=decode)
    elif peer:
        raise InvalidParameterError(f"unknown peer {peer!r} (eval supports llama.cpp)")
    elif (reference is None and dtype == "fp32" and opt == "O0" and not decode
          and Path(ref_engine.model_path).suffix.lower() != ".gguf"):
        cand = reference_scorer  # the model is its own reference (a GGUF's native blocks are not: scored below)
    else:
        cand = OursScorer(Engine(model=model, progress=progress, dtype=dtype), decode=decode)
        if opt != "O0":
            cand.engine.compile(opt, max_len=ctx)
            cand.label += f" {cand.engine.optimize_level}"
        if decode:
            cand.label += " decode"
    return evaluate(cand, reference_scorer, tokens, n_tokens, ctx, n_weights, progress)
