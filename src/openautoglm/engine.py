"""The Engine: the API users see. Load a model, pick a device, compile, generate.

    engine = Engine(model="smollm2-135m-instruct")      # alias, HF directory or .gguf file
    engine.enable_hardware_acceleration(device="cpu")   # "cpu" | "cuda" | "auto"
    engine.compile(optimize_level="O0")
    print(engine.infer(input_data="Explain KV caching in one sentence."))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch

from .errors import DeviceNotAvailableError, InvalidParameterError, OptimizeLevelError
from .hub import DEFAULT_MODEL, resolve
from .runtime.generate import Generation, GenerationResult
from .runtime.runner import ModelRunner
from .runtime.sampler import SamplingParams
from .sysmem import return_freed_memory

#: Every optimize level, in order. See ``compile``.
OPTIMIZE_LEVELS = ("O0", "O1", "O2", "O3")
#: The default: O3 when this machine has built it for the model, else O1 while O3 builds in the background.
AUTO = "auto"


def available_devices() -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


def resolve_device(device: str) -> str:
    """The concrete device for ``device`` ("auto" resolved); DeviceNotAvailableError if this machine lacks it."""
    avail = available_devices()
    if not isinstance(device, str):
        raise DeviceNotAvailableError(f"device must be a string, one of {', '.join(avail + ['auto'])}")
    d = device.lower()
    if d == "auto":
        d = "cuda" if "cuda" in avail else "cpu"
    if d not in avail:
        raise DeviceNotAvailableError(
            f"device {device!r} is not available on this machine; available: {', '.join(avail + ['auto'])}"
        )
    return d


def resolve_level(optimize_level: str) -> str:
    """The canonical level name ("auto" or O0-O3); OptimizeLevelError if unknown."""
    if str(optimize_level).lower() == AUTO:
        return AUTO
    lvl = str(optimize_level).upper()
    if lvl not in OPTIMIZE_LEVELS:
        raise OptimizeLevelError(f"unknown optimize level {optimize_level!r}; levels: "
                                 f"{', '.join((AUTO,) + OPTIMIZE_LEVELS)}")
    return lvl


DTYPES = ("fp32", "bf16")  # runtime dtypes of float weights and activations (``Engine(dtype=...)``)


class Engine:
    """A loaded model with its tokenizer, ready to generate.

    Args:
        model: an alias (``smollm2-135m-instruct``), a HF model directory, or a ``.gguf`` file.
        device: where to run; same values as :meth:`enable_hardware_acceleration`.
        progress: show loading progress on stderr.
        gguf_weights: for a GGUF file, "native" (default) keeps its quantized tensors as stored and computes on
            them (``GGMLLinear``: no float copy, llama.cpp's bytes per token); "float" dequantizes every tensor to
            float32 (the reference, as transformers loads a GGUF).
        dtype: the runtime dtype of the float weights and the activations: "fp32" (default) or "bf16" (half the
            float weights' memory; bf16 GEMMs where the CPU has them). GGML blocks stay as stored either way. Set at
            load, before anything is compiled (the compiled step is specialized to it); every caller that wants
            bf16 asks here, nobody converts the model by hand.
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, device: str = "cpu", progress: bool = True,
                 gguf_weights: str = "native", dtype: str = "fp32"):
        from .formats import open_checkpoint
        from .loader import GGUF_WEIGHTS, load_model
        from .tokenizer import Tokenizer

        t0 = time.perf_counter()
        self.progress = progress
        if gguf_weights not in GGUF_WEIGHTS:
            raise InvalidParameterError(f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got {gguf_weights!r}")
        if dtype not in DTYPES:
            raise InvalidParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.model_path = resolve(model, progress=progress)
        self.gguf_weights = gguf_weights
        ckpt = open_checkpoint(self.model_path)
        # the tokenizer before the weights: its temporaries (a GGUF's vocabulary as Python strings, the BPE tables
        # built from them) are freed before the weights arrive instead of adding to the peak beside them
        src = ckpt.tokenizer
        if src.get("kind") == "gguf":
            self.tokenizer = Tokenizer.from_gguf_metadata(src["metadata"])
            ckpt.release_vocabulary()
        else:
            from .models import ModelConfig

            self.tokenizer = Tokenizer.from_hf_dir(src["dir"], ModelConfig.from_hf(ckpt.config).eos_token_id)
        self.model, self.checkpoint = load_model(ckpt, progress=progress, gguf_weights=gguf_weights)
        self._apply_dtype()
        self.config = self.model.config
        self.eos_ids = set(self.config.eos_token_id) | self.tokenizer.eog_ids
        self.device = "cpu"
        self.optimize_level = "O0"
        self.load_seconds = time.perf_counter() - t0
        if device != "cpu":
            self.enable_hardware_acceleration(device)

    # ---- configuration ------------------------------------------------------------------------------
    def enable_hardware_acceleration(self, device: str = "auto") -> "Engine":
        """Run on ``device``: "cpu", "cuda" or "auto" (cuda when present, else cpu).

        Raises DeviceNotAvailableError, naming the devices this machine has, for anything else.
        """
        d = resolve_device(device)
        if d != "cpu" and self._has_ggml():  # the block kernels are CPU code: other devices take float weights
            self._reload_float()
        if d != self.device:
            self.model.to(d)
            self.device = d
        return self

    def compile(self, optimize_level: str = AUTO, max_batch: int = 1, max_len: int | None = None,
                kv_dtype: str = "auto") -> "Engine":
        """Prepare the model at ``optimize_level`` (see ``openautoglm.compiler``): "O0" is the eager reference;
        "O1" adds the load-time passes and a static memory plan (``info()["compile"]["memory_plan"]``), with
        the KV cache for ``max_batch`` rows of ``max_len`` tokens allocated once; "O2" adds the decode step
        compiled ahead of time; "O3" adds kernel and thread autotuning (minutes the first time on a machine,
        cached after). "auto" (the default): O3 at once where this machine has built it for this model, else O1
        now while O3 builds in a background process, switched to at the first generation after it is done
        (``compiler/background.py``). Quantize before compiling.

        ``kv_dtype``: the planned KV cache's dtype at O1+: "auto" (the activations', fp16 where O3's decode
        attention reads it), "fp32", "bf16", "fp16" or "int8" (int8 codes with an fp16 scale per token and kv head:
        about half of bf16's bytes).
        """
        level = resolve_level(optimize_level)
        from .runtime.kv_cache import KV_DTYPES

        if kv_dtype != AUTO and kv_dtype not in KV_DTYPES:
            raise InvalidParameterError(f"unknown KV cache dtype {kv_dtype!r}; choose auto, {', '.join(KV_DTYPES)}")
        if getattr(self, "compiled", None) is not None and self.compiled.level != "O0":
            raise InvalidParameterError(f"this engine is already compiled at {self.compiled.level}")
        if max_batch < 1:
            raise InvalidParameterError(f"max_batch must be at least 1, got {max_batch}")
        if level != AUTO:
            return self._compile(level, max_batch, max_len, kv_dtype)
        from .compiler import background

        max_len = min(max_len or 2048, self.config.max_position_embeddings)
        key = None
        if self.device == "cpu" and not getattr(self, "quant_result", None):  # (an in-memory quantization: no rebuild)
            key = background.build_key(self.model_path, "O3", max_batch, max_len, self.gguf_weights, kv_dtype,
                                      self.dtype)
        if key is not None and background.is_warm(key):
            return self._compile("O3", max_batch, max_len, kv_dtype)
        self._compile("O1", max_batch, max_len, kv_dtype)
        if key is not None and background.enabled():
            self._build = background.start(key, self.model_path, "O3", max_batch, max_len, self.gguf_weights,
                                           kv_dtype, self.dtype)
            self._build_args = (max_batch, max_len, kv_dtype)
            # leave the build a core while it runs: intra-op threads that share a core with it stall at every
            # barrier (measured on 2 cores: O1 decode 1-2 tok/s on two threads beside the build, ~46 alone)
            import torch

            self._threads = torch.get_num_threads()
            if self._threads > 1:
                torch.set_num_threads(self._threads - 1)
            if self.progress:
                import sys

                sys.stderr.write(f"[openautoglm] running at O1; O3 (tuned kernels, compiled decode) is being built "
                                 f"in the background for this machine (pid {self._build.pid}, log "
                                 f"{self._build.log}); it is used as soon as it is ready, and from the start "
                                 f"next time\n")
        return self

    def _compile(self, level: str, max_batch: int, max_len: int | None, kv_dtype: str = AUTO) -> "Engine":
        from .compiler import background, compile_model

        key = None
        if level == "O3" and self.device == "cpu" and not getattr(self, "quant_result", None):
            # (before compiling: O3 tunes the thread count, which is part of the key)
            max_len = min(max_len or 2048, self.config.max_position_embeddings)
            key = background.build_key(self.model_path, "O3", max_batch, max_len, self.gguf_weights, kv_dtype,
                                      self.dtype)
        self.compiled = compile_model(self.model, level, max_batch=max_batch, max_len=max_len, progress=self.progress,
                                      kv_dtype=kv_dtype)
        cache = self.compiled.cache
        if cache is not None and cache.dtype == torch.int8:  # its key smoothing, from real text
            from .data import calibration_tokens

            cache.calibrate_keys(self.model, calibration_tokens(self.tokenizer, min(512, cache.max_len)))
        self.optimize_level = level
        if key is not None:
            background.mark_warm(key, {"model": str(self.model_path), "max_batch": max_batch, "max_len": max_len,
                                       "kv_dtype": kv_dtype,
                                       "compile_seconds": round(self.compiled.compile_seconds, 1)})
        return self

    def _switch_if_built(self) -> None:
        """At a generation boundary: move to O3 once the background build is done (its packages and kernel
        choices load from the cache in seconds)."""
        b = getattr(self, "_build", None)
        if b is None or not b.done():
            return
        self._build = None
        import torch

        torch.set_num_threads(self._threads)  # (O3's own tuned count replaces it when it loads)
        if b.ok():
            self._compile("O3", *self._build_args)

    def model_runner(self, compile_missing: bool = True) -> ModelRunner:
        """What runs this engine's model as compiled now (see ``runtime/runner.py``): its planned cache, length
        buckets and decode step. ``compile_missing=False``: a decode length with no built step runs on a longer
        one (or eager) instead of compiling it (a server)."""
        self._switch_if_built()
        return ModelRunner.for_engine(self, compile_missing)

    def new_generation(self, prompts: list[list[int]], params, eos_ids=None) -> Generation:
        """A :class:`Generation` on this engine's runner."""
        return Generation(self.model_runner(), self.tokenizer, prompts, params,
                          self.eos_ids if eos_ids is None else eos_ids)

    # ---- compression ---------------------------------------------------------------------------------
    def quantize(self, scheme: str = "int4", group_size: int = 32, method: str = "gptq",
                 target_bits: float | None = None, embeddings: str = "int8", calib_text: str | None = None,
                 calib_tokens: int = 8192, act_order: bool = True) -> dict:
        """Quantize the loaded model in place and return the per-layer plan ``{layer: config}``.

        ``scheme``: "int8" (weight-only, per channel), "int4" / "int3" / "int2" (weight-only, per group of
        ``group_size``), "w8a8" (int8 weights and dynamic per-token int8 activations) or "auto" (per-layer
        mixed precision at ``target_bits`` average bits per weight, scales included). ``method``: "gptq" (the
        default: Hessian error compensation, ``act_order``; minutes on 2 cores) or "awq" (activation-aware
        scaling), calibrated on ``calib_text`` (default: the calibration split of the shipped corpus), or "rtn"
        (round to nearest: seconds, lower quality). ``embeddings``: the embedding table and ``lm_head`` (one
        tensor when tied) at "int8" (default, as llama.cpp keeps them at 8 bits), the "same" scheme, or left in
        "float"; auto plans choose them like any layer unless "float".
        Details land in ``self.quant_result``.
        """
        from .quant.pipeline import quantize_model

        if getattr(self, "quant_result", None) or self.checkpoint.config.get("quantization"):
            raise InvalidParameterError("this model is already quantized")
        if getattr(self, "compiled", None) is not None and self.compiled.level != "O0":
            raise InvalidParameterError("quantize before compiling (the compiler rewrites the layers)")
        if self._has_ggml():  # quantizing starts from the GGUF's dequantized weights, as it always did
            self._reload_float()
        self.quant_result = quantize_model(
            self.model, self.tokenizer, self.model_path, scheme, group_size=group_size, method=method,
            target_bits=target_bits, embeddings=embeddings, calib_text=calib_text, calib_tokens=calib_tokens,
            act_order=act_order, progress=self.progress)
        return_freed_memory()  # the float weights just freed
        return self.quant_result.plan

    def _has_ggml(self) -> bool:
        from .quant.modules import GGMLLinear

        return any(isinstance(m, GGMLLinear) for m in self.model.modules())

    def _apply_dtype(self) -> None:
        if self.dtype == "bf16":
            self.model.to(torch.bfloat16)  # (floating-point tensors only: GGML blocks and codes stay as stored)

    def _reload_float(self) -> None:
        """The model again, with a GGUF's tensors dequantized to float32 (what quantizing and non-CPU devices
        take)."""
        from .loader import load_model

        self.model = None
        self.model, self.checkpoint = load_model(self.model_path, progress=self.progress, gguf_weights="float")
        self._apply_dtype()
        self.config = self.model.config
        self.gguf_weights = "float"
        return_freed_memory()

    @property
    def quant_scheme(self) -> str | None:
        r = getattr(self, "quant_result", None)
        return r.scheme if r else None

    def save(self, output: str | Path) -> Path:
        """Write a quantized artifact directory (atomically) that ``Engine(model=output)`` loads as is."""
        from .quant.artifact import save_artifact

        r = getattr(self, "quant_result", None)
        if r is None:
            raise InvalidParameterError("nothing to save: quantize the model first")
        cfg = {k: v for k, v in self.checkpoint.config.items() if k != "quantization"}
        extra = {"source": str(Path(self.model_path).resolve()), "bits_per_weight": r.bits_per_weight,
                 "calibration_kld": r.calibration_kld}
        if r.report:
            extra["report"] = r.report
        return save_artifact(self.model, cfg, self.tokenizer, r.plan, output, r.scheme, r.method, extra)

    # ---- generation ---------------------------------------------------------------------------------
    def _params(self, max_tokens=128, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                seed=None, stop=None, stop_token_ids=None, ignore_eos=False, grammar=None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed, stop=stop or (),
                              stop_token_ids=tuple(stop_token_ids or ()), ignore_eos=ignore_eos, grammar=grammar)

    def encode_input(self, input_data) -> tuple[list[list[int]], bool]:
        """Token ids for ``input_data`` (str, list of str, or chat messages); and whether it was a batch."""
        tok = self.tokenizer
        if isinstance(input_data, str):
            return [tok.encode(input_data)], False
        if isinstance(input_data, list) and input_data and all(isinstance(x, dict) for x in input_data):
            return [tok.encode_chat(input_data)], False
        if isinstance(input_data, list) and input_data and all(isinstance(x, str) for x in input_data):
            return [tok.encode(x) for x in input_data], True
        if isinstance(input_data, list) and input_data and all(isinstance(x, list) for x in input_data):
            return [tok.encode_chat(x) for x in input_data], True
        raise InvalidParameterError(
            "input_data must be a string, a list of strings, or chat messages (a list of {'role', 'content'} dicts)"
        )

    def generate(self, input_data, **kwargs) -> list[GenerationResult]:
        """Full results (text, token ids, finish reason, token counts), one per prompt."""
        return self._generate(self.encode_input(input_data)[0], kwargs)

    def _generate(self, prompts: list[list[int]], kwargs: dict) -> list[GenerationResult]:
        g = self.new_generation(prompts, self._params(**kwargs))
        for _ in g:
            pass
        return [GenerationResult(q.text, q.out_ids, q.finish_reason, len(q.prompt_ids), len(q.out_ids))
                for q in g.sequences]

    def infer(self, input_data, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, seed: int | None = None, stop=None, **kwargs):
        """Generate for a prompt (str), a batch (list of str) or chat messages (list of dicts).

        Returns the generated text, or a list of texts for a batch. Greedy by default (temperature 0).
        Extra keyword arguments: ``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``ignore_eos``, and
        ``grammar`` (a ``runtime.grammar.Grammar``: the output matches a JSON schema, JSON, a regex or a Lark
        grammar).
        """
        prompts, batched = self.encode_input(input_data)
        res = self._generate(prompts, dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                           seed=seed, stop=stop, **kwargs))
        texts = [r.text for r in res]
        return texts if batched else texts[0]

    def stream(self, input_data, **kwargs) -> Iterator[str]:
        """Yield text pieces of one prompt or chat as they are generated (same arguments as :meth:`infer`)."""
        prompts, batched = self.encode_input(input_data)
        if batched:
            raise InvalidParameterError("stream() takes one prompt or one conversation, not a batch")
        g = self.new_generation(prompts, self._params(**kwargs))

        def pieces():
            for ev in g:
                if ev.text:
                    yield ev.text

        return pieces()

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice=None,
             parallel_tool_calls: bool = True, response_format: dict | None = None, **kwargs):
        """The assistant's reply to ``messages`` (rendered with the model's chat template).

        Without ``tools`` and ``response_format``: the reply text. With them (OpenAI's shapes): the assistant
        message as a dict, ``{"role": "assistant", "content": str | None, "tool_calls": [...]}`` (``tool_calls``
        only when the model called tools). ``tool_choice``: "auto" (default), "none", "required" or
        ``{"type": "function", "function": {"name": ...}}``; calls are grammar-constrained, so they are valid
        JSON for a declared tool. ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema",
        "json_schema": {"name": ..., "schema": {...}}}``; the content then parses and validates."""
        from .tokenizer import validate_messages
        from .toolcall import ChatPlan

        validate_messages(messages)
        if tools is None and tool_choice is None and response_format is None:
            return self.infer(messages, **kwargs)
        plan = ChatPlan(self.tokenizer, messages, tools, tool_choice, parallel_tool_calls, response_format)
        res = self._generate([plan.prompt_ids], {**kwargs, "grammar": plan.grammar})[0]
        return plan.message(res.text)

    # ---- introspection ------------------------------------------------------------------------------
    def info(self) -> dict:
        """Architecture, parameter count, weight bytes by storage type, context length, device, level."""
        from .compiler.memory_plan import weight_bytes_by_dtype

        cfg = self.config
        n_params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        ckpt = self.checkpoint
        return {
            "model": str(self.model_path),
            "format": ckpt.format,
            "architecture": cfg.model_type,
            "parameters": n_params,
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "file_weight_bytes": ckpt.weight_bytes_by_storage(),
            "runtime_weight_bytes": weight_bytes_by_dtype(self.model),
            "device": self.device,
            "dtype": self.dtype,
            "optimize_level": self.optimize_level,
            "compile": self.compiled.info() if getattr(self, "compiled", None) is not None else None,
            "chat_template": bool(self.tokenizer.chat_template),
            "load_seconds": round(self.load_seconds, 3),
        }
