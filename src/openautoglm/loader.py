"""Checkpoint -> ready ``nn.Module``: the glue between ``formats/`` and ``models/``.

The model is built on the meta device and each tensor is read once and assigned in place. A GGUF file's
quantized tensors (Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) become ``GGMLLinear`` layers on their blocks as stored,
and Q4_0/Q4_1 ``IntxLinear`` int4 layers on the same codes (``quant/ggml.py``; ``GGMLLinear`` too where its rows
interleave, on AVX-512 VNNI), so no float copy of them ever exists (``gguf_weights="native"``, the default; the native operators are needed);
``gguf_weights="float"`` dequantizes every tensor to float32, the reference. Loading shows progress on stderr.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import InvalidModelError, InvalidParameterError
from .formats import Checkpoint, open_checkpoint
from .models import ModelConfig, build_model, materialize
from .progress import Progress
from .sysmem import return_freed_memory


GGUF_WEIGHTS = ("native", "float")


def load_model(source: str | Path | Checkpoint, progress: bool = True,
               gguf_weights: str = "native") -> tuple[nn.Module, Checkpoint]:
    if gguf_weights not in GGUF_WEIGHTS:
        raise InvalidParameterError(f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got {gguf_weights!r}")
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    cfg = ModelConfig.from_hf(ckpt.config)
    model = build_model(cfg)
    qinfo = ckpt.config.get("quantization")
    if qinfo:  # a quantized artifact: its planned linears become quantized modules, read as stored
        from .quant.artifact import apply_quantized_structure

        apply_quantized_structure(model, qinfo, ckpt.load_raw)
    if ckpt.format == "gguf" and gguf_weights == "native":
        _ggml_layers(model, ckpt, progress)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.is_meta}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(ckpt.tensors))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InvalidModelError(f"{ckpt.path} lacks tensors the {cfg.model_type} model needs: {', '.join(missing[:3])}{more}")

    state = {}
    with Progress(f"loading {Path(ckpt.path).name}", total=len(expected), unit=" tensors", enabled=progress) as pb:
        for name in sorted(expected):
            t = ckpt.load(name)
            if tuple(t.shape) != tuple(params[name].shape):
                raise InvalidModelError(
                    f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(params[name].shape)}"
                )
            state[name] = t
            pb.update()
    model.load_state_dict(state, strict=False, assign=True)
    materialize(model)
    return_freed_memory()  # the readers' temporaries: RSS is the weights, not the heap they passed through
    model.eval().requires_grad_(False)
    return model, ckpt


def _ggml_layers(model: nn.Module, ckpt: Checkpoint, progress: bool) -> None:
    """Replace every linear (and the embedding) whose GGUF tensor has a GGML block type our kernels compute on
    by a ``GGMLLinear`` on its stored blocks; the tied head shares the embedding's blocks."""
    from . import kernels

    if not kernels.load_ops():  # no C++ compiler: every tensor is dequantized to float, as before
        return
    from .quant.api import install
    from .quant.ggml import INT4_TYPES, int4_from_ggml
    from .quant.modules import GGMLLinear

    def ggml(name: str, shape: tuple[int, int], gathered_only: bool = False):
        info = ckpt.tensors.get(f"{name}.weight")
        if info is None or info.storage not in kernels.GGML_TYPES or len(info.shape) != 2:
            return None
        if tuple(info.shape) != shape:
            raise InvalidModelError(f"{ckpt.path}: tensor {name}.weight has shape {tuple(info.shape)}, the config "
                                    f"implies {shape}")
        bias = ckpt.load(f"{name}.bias") if f"{name}.bias" in ckpt.tensors else None
        if bias is not None and tuple(bias.shape) != shape[:1]:
            raise InvalidModelError(f"{ckpt.path}: tensor {name}.bias has shape {tuple(bias.shape)}, the config "
                                    f"implies {shape[:1]}")
        if gathered_only and bias is None:
            # an untied embedding's rows are only gathered: mapped from the file, stored layout (no GEMV reads
            # it), a page resident once a token on it is seen (llama.cpp's mmap'd weights do the same)
            return GGMLLinear(ckpt.map_raw(f"{name}.weight"), info.storage, info.shape[1], None, gathered_only=True)
        raw = ckpt.load_raw(f"{name}.weight")
        # Q4_0/Q4_1: the same codes in our int4 format (O3's tuned int4 kernels), except where the GGML rows
        # interleave (AVX-512 VNNI): their int8 block GEMV and GEMM there take 0.4-0.6x the int4 decode kernel's
        # time and 0.6-0.8x the int4 prefill's (SmolLM2's shapes, Zen 4)
        if info.storage in INT4_TYPES and not kernels.interleaves(info.storage, shape[0]):
            return int4_from_ggml(raw, info.storage, info.shape[1], bias)
        return GGMLLinear(raw, info.storage, info.shape[1], bias, owned=True)

    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head"}
    cfg = model.config
    table = (cfg.vocab_size, cfg.hidden_size)
    with Progress(f"reading {Path(ckpt.path).name}'s quantized tensors", total=len(linears) + 1, unit=" tensors",
                  enabled=progress) as pb:
        for name, shape in linears.items():
            if (mod := ggml(name, shape)) is not None:
                install(model, name, mod)
            pb.update()
        tied = cfg.tie_word_embeddings
        head = ggml("model.embed_tokens" if tied else "lm_head", table)
        if head is not None:
            install(model, "lm_head", head)  # tied: the embedding reads its rows from the head
        if not tied and (emb := ggml("model.embed_tokens", table, gathered_only=True)) is not None:
            install(model, "model.embed_tokens", emb)
        pb.update()
