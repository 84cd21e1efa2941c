"""The systems ``bench`` compares, behind one small interface.

A system loads once, then ``run(prompt_ids, gen_tokens, batch)`` does one greedy generation of exactly
``gen_tokens`` new tokens per row, timing the first token (prefill) and the rest (decode) on the wall clock.
Ours goes through the same ``Generation`` loop as the Engine; llama.cpp through llama-cpp-python's
``Llama.generate``; transformers through ``generate`` with a streamer that stamps each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class Skip(Exception):
    """This system/configuration cannot run here; the message says why."""


@dataclass
class Timing:
    ttft_s: float
    decode_s: float
    prompt_tokens: int
    gen_tokens: int
    batch: int

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        return self.batch * (self.gen_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class Ours:
    name = "openautoglm"

    @staticmethod
    def imports():
        import torch  # noqa: F401

        from .. import engine  # noqa: F401

    def __init__(self, model: str, config: str, threads: int, n_ctx: int):
        import torch

        from ..engine import OPTIMIZE_LEVELS

        if config == "default":  # what a user gets with no flags, once this machine has built O3 for the model
            config = "O3:native"
        level, _, scheme = config.partition(":")
        level, scheme = level.upper(), scheme or "fp32"
        if level not in OPTIMIZE_LEVELS:
            raise Skip(f"unknown optimize level {level}")
        from pathlib import Path

        from ..quant.config import parse_scheme

        quant = None
        if scheme not in ("fp32", "bf16", "native"):
            try:
                cfg = parse_scheme(scheme)
                quant = (cfg.scheme, getattr(cfg, "group_size", 32))
            except ValueError:
                if not Path(scheme).exists():
                    raise Skip(f"unknown scheme {scheme}: fp32, bf16, int8, w8a8, int4/int3/int2-gN, or an "
                               "artifact path") from None
                model, scheme = scheme, "fp32"
        torch.set_num_threads(threads)
        from ..engine import Engine

        # "native": a GGUF's quantized tensors computed on as stored (the default); fp32/bf16: dequantized
        self.engine = Engine(model=model, progress=False, gguf_weights="native" if scheme == "native" else "float",
                             dtype="bf16" if scheme == "bf16" else "fp32")
        if quant:  # round-to-nearest, as `openautoglm quantize --method rtn` does (int8 embedding table)
            self.engine.quantize(quant[0], group_size=quant[1], method="rtn")
        # the context every system gets (llama.cpp's n_ctx), rounded up to the compiler's length bucket: the KV
        # cache is sized for it, as llama.cpp's is
        from ..compiler import LEN_BUCKET

        self.engine.compile(level, max_len=-(-n_ctx // LEN_BUCKET) * LEN_BUCKET)
        self.tokenizer = self.engine.tokenizer

    def weight_bytes(self) -> int:
        return sum(self.engine.info()["runtime_weight_bytes"].values())

    def packages_built(self) -> int:
        """Ahead-of-time packages compiled in this process (O2/O3), not loaded from the on-disk cache."""
        runner = getattr(getattr(self.engine, "compiled", None), "runner", None)
        return getattr(runner, "packages_built", 0)

    def run(self, prompt_ids: list[int], gen_tokens: int, batch: int) -> Timing:
        from ..runtime.sampler import SamplingParams

        p = SamplingParams(max_tokens=gen_tokens, ignore_eos=True)
        c = getattr(self.engine, "compiled", None)
        if c is not None:
            c.session["ids"] = None  # no prefix reuse between trials (the peers reset theirs too)
        g = self.engine.new_generation([prompt_ids] * batch, p, eos_ids=set())
        t0 = time.perf_counter()
        t_first = None
        for _ in g:
            if t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        assert all(len(s.out_ids) == gen_tokens for s in g.sequences)
        assert g.reused == 0, "a trial reused a previous trial's prefill"
        return Timing(t_first - t0, t_end - t_first, len(prompt_ids), gen_tokens, batch)


class LlamaCpp:
    name = "llama.cpp"

    @staticmethod
    def imports():
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            pass  # reported as a skip by the constructor

    def __init__(self, model: str, config: str, threads: int, n_ctx: int):
        from pathlib import Path

        if not str(model).endswith(".gguf"):
            raise Skip("llama.cpp needs a .gguf file")
        try:
            import llama_cpp
        except ImportError:
            raise Skip("llama-cpp-python is not installed (make bench installs it: the 'peers' extra)") from None
        self.path = Path(model)
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=512, n_ubatch=512, verbose=False)
        self._llama_cpp = llama_cpp

    def weight_bytes(self) -> int:
        try:
            return int(self._llama_cpp.llama_model_size(self.llm.model))
        except Exception:
            return self.path.stat().st_size

    def run(self, prompt_ids, gen_tokens, batch):
        if batch != 1:
            raise Skip("llama-cpp-python's Llama generates one sequence at a time")
        self.llm.reset()  # no prefix reuse between trials
        t0 = time.perf_counter()
        t_first = None
        n = 0
        for _tok in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                      reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n == gen_tokens:
                break
        t_end = time.perf_counter()
        return Timing(t_first - t0, t_end - t_first, len(prompt_ids), gen_tokens, 1)


class LlamaBench:
    """llama.cpp's own benchmark tool (``llama-bench``, built by ``make install-peers`` from the llama.cpp source
    the llama-cpp-python sdist vendors) on the same GGUF and thread count: one invocation for the prompt
    (``-p P -n 0``), one for decoding after it (``-p 0 -n N -d P``: N tokens generated with P already in the
    cache, as our rows decode). It uses its own random prompt tokens (speed does not depend on them). Peak RSS is
    its child process's."""

    name = "llama-bench"

    @staticmethod
    def imports():
        pass

    @staticmethod
    def binary():
        import os
        import shutil
        import sys
        from pathlib import Path

        for c in (os.environ.get("OPENAUTOGLM_LLAMA_BENCH"), str(Path(sys.prefix) / "peers" / "bin" / "llama-bench"),
                  shutil.which("llama-bench")):
            if c and Path(c).is_file() and os.access(c, os.X_OK):
                return c
        return None

    def __init__(self, model: str, config: str, threads: int, n_ctx: int):
        from pathlib import Path

        if not str(model).endswith(".gguf"):
            raise Skip("llama-bench needs a .gguf file")
        self.bin = self.binary()
        if self.bin is None:
            raise Skip("llama-bench is not built (make install-peers builds it)")
        self.path, self.threads = Path(model), threads

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def _tok_s(self, p: int, n: int, d: int) -> float:
        import json
        import subprocess

        cmd = [self.bin, "-m", str(self.path), "-t", str(self.threads), "-p", str(p), "-n", str(n), "-d", str(d),
               "-r", "1", "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise Skip(f"llama-bench failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
        rows = json.loads(out.stdout)
        return float(rows[0]["avg_ts"])

    def run(self, prompt_ids, gen_tokens, batch):
        if batch != 1:
            raise Skip("llama-bench measures one sequence")
        P = len(prompt_ids)
        pp, tg = self._tok_s(P, 0, 0), self._tok_s(0, gen_tokens - 1, P)
        return Timing(P / pp, (gen_tokens - 1) / tg, P, gen_tokens, 1)

    def peak_rss_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


class Transformers:
    name = "transformers"

    @staticmethod
    def imports():
        import torch  # noqa: F401

        try:
            import transformers  # noqa: F401
        except ImportError:
            pass

    def __init__(self, model: str, config: str, threads: int):
        from pathlib import Path

        import torch

        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise Skip("transformers is not installed (the 'test' extra)") from None
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(config or "fp32")
        if dtype is None:
            raise Skip(f"transformers runs fp32 or bf16, not {config}")
        torch.set_num_threads(threads)
        p = Path(model)
        try:
            if p.suffix == ".gguf":
                self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
        except ImportError as e:
            raise Skip(f"transformers cannot load this model here: {e}") from None
        self.model.eval()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt_ids, gen_tokens, batch):
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps = []

        class Stamp(LogitsProcessor):  # called once a step, on the logits just computed: any batch size
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor([prompt_ids] * batch)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_tokens,
                                      min_new_tokens=gen_tokens, do_sample=False, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([Stamp()]))
        t_end = time.perf_counter()
        assert out.shape[1] == len(prompt_ids) + gen_tokens and len(stamps) == gen_tokens
        # stamps[0]: the prompt's forward pass is done (the first token's logits); a batch's prefill used to be timed
        # in a second, separate forward and subtracted, which a burst of load could make exceed the whole run
        return Timing(stamps[0] - t0, t_end - stamps[0], len(prompt_ids), gen_tokens, batch)
