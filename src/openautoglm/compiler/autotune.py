"""O3: the kernel selector. For each distinct linear (format, N, K) and token-count bucket (decode: up to the
planned batch; prefill: the planned chunk) it times the implementations this CPU offers (modules in
``impls.py``; this file only measures and chooses). A plan for several rows times decode at the full batch and
at one row (a server decodes both) and takes the implementation whose worst slowdown against the best at
either count is least:

- ``native``: the layer's own kernel (int4/int8 weight-only packs, W8A8 ``_int_mm``, the float GEMM, or a GGUF
  layer's block GEMV and dequantizing GEMM): always eligible, since it defines the layer (GGML layers have no other);
- ``bf16``: a bf16 GEMM on the layer's weights dequantized once (oneDNN, AMX where the CPU has it); it costs
  2 bytes a weight of memory, so it is granted only where it beats every free candidate by ``COPY_MIN_GAIN``,
  within a memory budget, best time saved per byte first;
- ``bf16-dq``: for int4 layers, a bf16 GEMM on weights dequantized at each call by the native kernel
  (``kernels/``) into a reused buffer: prefill's choice, costing no memory;
- ``f32-dq``: the same with fp32 weights and an fp32 GEMM: prefill's choice where the CPU has no native bf16
  (AVX2 only: its bf16 GEMMs run 5-8x slower than fp32 ones);
- ``w8a8``: for int8 weight-only layers, int8 activations per token and ``torch._int_mm``;
- ``gemv``: for int4 and int8 weight-only layers at decode's few rows, our weight-only GEMV operators
  (``kernels/gemv.cpp``: the portable codes streamed once, fp32 accumulation; int8 with AVX512-VNNI takes the
  activations as int16, one scale a row, in exact integer dot products), which AOTInductor's decode step
  calls through their C entry points (``kernels.c_shims``);
- ``gemv-a8``: for int4 layers at decode, the same with int8 activations per block of 8 and VNNI dot products
  (AVX512-VNNI, or AVX2's vpmaddubsw), as llama.cpp's Q4 x Q8 (blocks of 32 there). Int4 layers that never run
  their native kernel (``gemv``/``gemv-a8`` at decode, ``bf16-dq``/``f32-dq`` at prefill) build no CPU pack at all;
- ``gemm-a8``: for GGML layers held in the 16-row interleaved layout, their block GEMV at prefill's row counts
  too (an int8 GEMM on the blocks as stored, llama.cpp's arithmetic), against their dequantizing bf16 GEMM.

Attention is tuned the same way (``tune_attention``): SDPA against our ``decode_attention`` operator for decode's
one query position a row (each kv head's K and V read once for its query heads, only the slots the mask allows,
rows split into chunks over the threads), which reads an fp16 cache where the activations are fp32.

A candidate is eligible only if its output stays within the quality budget: relative error against the
layer's dequantize-then-matmul reference at most ``QUALITY_BUDGET`` (the bf16-activation level every
weight-only kernel already has), measured on inputs with outlier channels. The fastest eligible one is kept.
Choices are cached on disk (``~/.cache/openautoglm/autotune.json``) keyed by format, shape, bucket, dtype,
CPU flags, torch version, our native kernels' sources (timings of an edited kernel are stale) and thread count; a corrupt cache file is ignored and rewritten. The thread count is
tuned first, on the model's own decode-bucket linears.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from ..host import atomic_write_text, cache_root, cpu_key
from ..models.layers import Attention, attention
from ..progress import Progress
from .impls import DECODE_MAX, DecodeAttention, GemvLinear, TunedLinear, reference, implementations

QUALITY_BUDGET = 1e-2
# a kept bf16 copy costs 2 bytes a weight for as long as the model lives (4x int4 codes): granted only where it is
# at least this much faster than the best implementation that keeps nothing (int4 prefill: the dequantizing GEMM
# is within 5-25% of the copy here, so no copy is kept)
COPY_MIN_GAIN = 0.25
DECODE_ONLY = ("gemv", "gemv-a8")
# dequantize the whole matrix per call (ctypes, not traceable into the compiled decode step): prefill only
PREFILL_ONLY = ("bf16-dq", "f32-dq", "gemm-a8")
FEWER_THREADS_GAIN = 0.1
BACKGROUND_ENV = "OPENAUTOGLM_IN_BACKGROUND_BUILD"  # set in a background build's environment (``background.start``)


def cache_file() -> Path:
    return cache_root() / "autotune.json"


def load_cache(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except FileNotFoundError:
        return {}
    except (ValueError, OSError):
        import sys

        sys.stderr.write(f"[openautoglm] ignoring a corrupt autotune cache {path}; tuning again\n")
        return {}


def save_cache(path: Path, d: dict) -> None:
    atomic_write_text(path, json.dumps(d, indent=0, sort_keys=True))


def _fmt(mod: nn.Module) -> str:
    cfg = getattr(mod, "config", None)
    return cfg.name if cfg is not None and hasattr(cfg, "name") else str(mod.weight.dtype).replace("torch.", "")


def tune_attention(model: nn.Module, batch: int, kv_len: int, cache: dict, key_base: str) -> str:
    """Time SDPA and our decode attention on the model's attention shape at the planned batch and cache length,
    keep the faster one within the quality budget, and install it. Returns the choice. SDPA reads a cache in the
    activation dtype; the decode attention, with fp32 activations, an fp16 cache (half the bytes a step reads; its
    rounding is part of the measured error), which the compiler then plans."""
    from .. import kernels

    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (Attention, DecodeAttention))]
    cfg = model.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if not mods or not kernels.attention_path(D):
        return "sdpa"
    from ..runtime.kv_cache import activation_dtype

    dt = activation_dtype(model)
    key = f"attention|{batch}x{H}x{KV}x{kv_len}x{D}|{dt}|{key_base}|threads:{torch.get_num_threads()}|sdpa,decode-f16"
    if not isinstance(cache.get(key), dict):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(batch, H, 1, D, generator=g).to(dt)
        k, v = (torch.randn(batch, KV, kv_len, D, generator=g).to(dt) for _ in range(2))
        # decode attends up to its position: the last quarter of the cache is not filled yet
        mask = (torch.arange(kv_len) < max(1, kv_len * 3 // 4)).expand(batch, 1, 1, kv_len)
        ref = attention(q.double(), k.double(), v.double(), mask)
        kv16 = torch.float16 if dt == torch.float32 else dt
        res, fs = {}, {}
        for name, mod, kk, vv in (("sdpa", Attention(), k, v), ("decode", DecodeAttention(), k.to(kv16), v.to(kv16))):
            with torch.inference_mode():
                err = float((mod(q, kk, vv, mask).double() - ref).norm() / ref.norm())
            res[name] = None
            if err <= QUALITY_BUDGET:
                fs[name] = lambda x, mod=mod, kk=kk, vv=vv: mod(x, kk, vv, mask)
        res.update(_time_all(fs, q, rounds=20))
        cache[key] = res
    ok = {n: t for n, t in cache[key].items() if t is not None and n in ("sdpa", "decode")}
    pick = min(ok, key=ok.get) if ok else "sdpa"
    from ..quant.api import set_module

    for name, _ in mods:
        set_module(model, name, DecodeAttention() if pick == "decode" else Attention())
    return pick


def _time_all(fs: dict, x, rounds: int = 5) -> dict:
    """name -> seconds of one call: each candidate warmed twice, then timed once a round, the candidates
    interleaved, and the fastest round kept. A burst of load on a shared machine (hypervisor steal) slows whichever
    candidate it meets; interleaving spreads bursts over all of them and the minimum drops them (timing one
    candidate's calls back to back, then the next, once picked torch's int4 kernel over ours for a whole shape)."""
    best = {}
    with torch.inference_mode():
        for f in fs.values():
            f(x)
            f(x)
        for _ in range(rounds):
            for name, f in fs.items():
                t = time.perf_counter()
                f(x)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    return best


def _probe_input(m: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 100)]] *= 10  # outlier channels, as real activations have
    return x


def _linears(model):
    from ..quant.modules import QuantEmbedding

    # an untied quantized embedding registers its table as a submodule: it is read by rows, never multiplied
    # (a tied one reads the lm_head's table, which is multiplied and tuned as the head)
    tables = {id(m.table) for m in model.modules() if isinstance(m, QuantEmbedding) and not m.tied}
    for name, mod in model.named_modules():
        quantized = hasattr(mod, "qweight") or hasattr(mod, "raw")  # our int formats, GGML blocks
        if (name and (type(mod) is nn.Linear or quantized) and not isinstance(mod, TunedLinear)
                and id(mod) not in tables):
            yield name, mod


def _decode_pass(model, batch: int):
    """One pass over every linear in model order at decode's row count, each with the decode kernel that needs
    no CPU pack (our GEMV operators where they apply): the weights stream from memory as in a real step, which
    timing one layer again and again (cache-resident) does not show."""
    from .. import kernels

    fns = []
    for _, m in _linears(model):
        f = m.forward
        if type(m).__name__ == "IntxLinear" and m.bits == 4 and kernels.load_ops():
            f = GemvLinear(m, a8=bool(kernels.gemv_path("int4-a8", m.group_size))).forward
        elif type(m).__name__ == "Int8Linear" and kernels.load_ops():
            f = GemvLinear(m).forward
        fns.append((f, _probe_input(batch, m.in_features)))

    def run():
        for f, x in fns:
            f(x)
    return run


def tune_threads(model, batch: int, cache: dict, key_base: str) -> int:
    """The intra-op thread count for decode, up to the one set when tuning starts (the user's, or the cores): the
    fastest pass over all the model's linears (min of 6, in two blocks per count), fewer threads only when at
    least ``FEWER_THREADS_GAIN`` faster (memory-bound decode gains from every core; one noisy timing must not
    halve it). A background build (``BACKGROUND_ENV`` set) runs beside the engine it builds for, which holds
    the other cores: timed there, one thread always wins. It keeps the count it was given and caches nothing, so
    the first foreground load of the build (quiet then) tunes it."""
    top = torch.get_num_threads()
    if os.environ.get(BACKGROUND_ENV):
        return top
    # the model's linears are part of the key: one model's best count says nothing of another's (a small int4
    # model alone tuned to 1 thread; with its 28 MB head streamed as well, 2 are faster)
    shapes = hashlib.sha256(repr([(_fmt(m), m.out_features, m.in_features) for _, m in _linears(model)]).encode())
    key = f"threads|{key_base}|cpus:{os.cpu_count() or 1}|max:{top}|linears:{shapes.hexdigest()[:12]}"
    if key in cache:
        return int(cache[key])
    run = _decode_pass(model, batch)
    cands = sorted({1, max(1, top // 2), top}, reverse=True)
    times = {t: float("inf") for t in cands}
    with torch.inference_mode():
        # two blocks per count, in turn, so that a noisy stretch of the shared machine spoils at most one block
        # of each; a block's first pass after switching counts warms the thread pool up and is not timed
        for _ in range(2):
            for t in cands:
                torch.set_num_threads(t)
                run()
                for _ in range(3):
                    t0 = time.perf_counter()
                    run()
                    times[t] = min(times[t], time.perf_counter() - t0)
    torch.set_num_threads(top)
    best = top
    for t in sorted(times, reverse=True):
        if times[t] < times[best] * (1 - FEWER_THREADS_GAIN):
            best = t
    cache[key] = best
    return best


def tune_model(model: nn.Module, max_batch: int = 1, prefill_tokens: int = 512, memory_budget: int | None = None,
               progress: bool = True, kv_len: int = 512) -> dict:
    """Choose and install an implementation per linear and bucket. Returns a summary (also in ``info()``)."""
    from .memory_plan import weight_bytes

    path = cache_file()
    cache = load_cache(path)
    from .. import kernels

    base = f"{cpu_key()}|torch:{torch.__version__}|kernels:{kernels.sources_digest()}"
    top = torch.get_num_threads()
    threads = tune_threads(model, max_batch, cache, base)
    # decode runs at the tuned count; prefill (compute-bound) at every thread it was given (the runner switches)
    counts = {"decode": threads, "prefill": top}
    budget = weight_bytes(model) if memory_budget is None else memory_budget
    buckets = {"decode": max_batch, "prefill": prefill_tokens}
    layers = list(_linears(model))

    def rows(name: str, bucket: str) -> int:
        # the head only ever sees the rows whose logits are asked for (the last position of each sequence), so
        # prefill's token count would time it at a size it never runs at (and buy a bf16 copy it never uses)
        return max_batch if name == "lm_head" else buckets[bucket]

    def row_counts(name: str, bucket: str) -> list[int]:
        # a plan for several rows decodes one row too (a single stream through the server): time both, so a
        # kernel that wins only at the full batch (a GEMM on a weight copy) is not what one stream gets
        m = rows(name, bucket)
        return [m, 1] if bucket == "decode" and m > 1 else [m]

    timings = {}  # (fmt, N, K, bucket, rows) -> {impl: seconds or None when over the quality budget}
    with Progress("autotuning kernels", total=len(layers), unit=" linears", enabled=progress) as pb:
        for name, mod in layers:
            for bucket, m in ((b, m) for b in buckets for m in row_counts(name, b)):
                k = (_fmt(mod), mod.out_features, mod.in_features, bucket, m)
                torch.set_num_threads(counts[bucket])
                ck = (f"{k[0]}|{k[1]}x{k[2]}|{bucket}:{m}|{base}|threads:{counts[bucket]}"
                      f"|impls:{','.join(sorted(implementations(mod)))}")
                if k in timings:
                    continue
                if ck in cache:
                    timings[k] = cache[ck]
                    continue
                x = _probe_input(m, mod.in_features)
                with torch.inference_mode():
                    ref = reference(mod, x)
                res, fs = {}, {}
                for impl, (make, _) in implementations(mod).items():
                    res[impl] = None  # not a candidate, or over the quality budget
                    if impl in DECODE_ONLY and m > DECODE_MAX:
                        continue  # re-streams the weights for every row: not a candidate for prefill
                    if impl in PREFILL_ONLY and m <= DECODE_MAX:
                        continue
                    f = make(mod)
                    with torch.inference_mode():
                        err = float((f(x).float() - ref).norm() / ref.norm().clamp_min(1e-30))
                    # the layer's own kernel defines the layer; a GGML layer's gemm-a8 is that kernel (its decode
                    # GEMV, llama.cpp's arithmetic: int8 activations per block, per 256 for the K-quants) at more rows
                    if err <= QUALITY_BUDGET or impl in ("native", "gemm-a8"):
                        fs[impl] = f
                res.update(_time_all(fs, x))
                timings[k] = cache[ck] = res
            pb.update()
    torch.set_num_threads(threads)

    def scored(name: str, mod: nn.Module, bucket: str) -> dict:
        """{impl: seconds or None} for a layer and bucket; over several row counts, an implementation's worst
        slowdown against the best at each count (in the first count's seconds)."""
        ts = [timings[(_fmt(mod), mod.out_features, mod.in_features, bucket, m)] for m in row_counts(name, bucket)]
        if len(ts) == 1:
            return ts[0]
        both = set.intersection(*({n for n, t in r.items() if t is not None} for r in ts))
        best = [min(r[n] for n in both) for r in ts]
        worst = {n: max(r[n] / b if b > 0 else (1.0 if r[n] == 0 else math.inf) for r, b in zip(ts, best))
                 for n in both}
        unit = best[0] if best[0] > 0 else 1.0
        return {n: worst[n] * unit if n in both else None for n in ts[0]}

    # the fastest eligible implementation per layer and bucket; a memory-costly one only when it beats the best
    # free one by COPY_MIN_GAIN, by time saved per byte first
    wants = []
    for name, mod in layers:
        impls = implementations(mod)
        for bucket in buckets:
            res = scored(name, mod, bucket)
            ok = {n: t for n, t in res.items() if t is not None and n in impls}
            best = min(ok, key=ok.get)
            free = min(t for n, t in ok.items() if impls[n][1] == 0)
            if impls[best][1] > 0 and ok[best] <= free * (1 - COPY_MIN_GAIN):
                wants.append(((free - ok[best]) / impls[best][1], name, bucket, best))
    granted, used = {}, 0
    for _, name, bucket, best in sorted(wants, reverse=True):
        cost = implementations(model.get_submodule(name))[best][1]
        if (name, "bf16") in {(n, i) for (n, _), i in granted.items()}:
            cost = 0  # one bf16 copy serves both buckets
        if used + cost <= budget:
            granted[(name, bucket)] = best
            used += cost
    summary = {"threads": threads, "prefill_threads": top, "extra_bytes": used, "choices": {},
               "attention": tune_attention(model, max_batch, kv_len, cache, base)}
    from ..quant.api import set_module

    for name, mod in layers:
        impls = implementations(mod)
        chosen, fns = [], {}
        for bucket in buckets:
            res = scored(name, mod, bucket)
            ok = {n: t for n, t in res.items() if t is not None and n in impls and impls[n][1] == 0}
            pick = granted.get((name, bucket)) or min(ok, key=ok.get)
            if pick not in fns:
                fns[pick] = impls[pick][0](mod)
            chosen.append(pick)
        summary["choices"][f"{_fmt(mod)} {mod.out_features}x{mod.in_features}"] = chosen
        if chosen != ["native", "native"]:
            set_module(model, name, TunedLinear(mod, fns, tuple(chosen)))
    save_cache(path, cache)
    return summary
