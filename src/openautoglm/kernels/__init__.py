"""Native CPU kernels that torch's CPU ops lack, written in C and compiled at first use.

- ``dequant_int4_bf16``: int4 per-group weights (the portable layout of ``quant/primitives.py``) to bf16, bit for
  bit the torch reference (``w = (q - 8) * s + z`` in fp32, rounded to nearest even). O3 uses it for prefill:
  one dequantization per call, then oneDNN's bf16 GEMM (AMX where the CPU has it), instead of the int4 kernel,
  which re-expands the weights for every block of tokens; no bf16 copy of the weights is kept.
- ``dequant_int4_f32``: the same weights in fp32 (the reference before rounding), for the fp32 GEMM that CPUs
  without native bf16 (AVX2 only) run 5-8x faster than a bf16 one.

The C source ships with the package and is compiled by the system C compiler (``$CC``, else ``cc``/``gcc``: the
one AOTInductor needs anyway) into ``~/.cache/openautoglm/kernels``, keyed by the source and the compiler, and
written atomically. The code picks AVX-512 / AVX2 / scalar at run time, so the library is not tied to the CPU it
was built on. Calls go through ctypes on one thread: splitting a call over a second thread was slower here
(2 cores; torch's OpenMP workers spin between regions), and the kernel (~3 G weights/s a core with AVX-512) is
small next to the GEMM it feeds. Where no compiler works, ``available()`` is False and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("dequant.c")
_CFLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c11"]


def _which(env: str, names: tuple[str, ...]) -> str | None:
    for c in (os.environ.get(env), *names):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _build(compiler: str | None, src: Path, flags: list[str], extra_key: bytes = b"") -> Path | None:
    """Compile ``src`` into ``cache_root()/kernels`` once per (source, compiler, flags, ``extra_key``), written
    atomically; None where there is no compiler or the build fails (callers keep torch's kernels)."""
    if compiler is None:
        return None
    from ..host import atomic_path, cache_root

    key = hashlib.sha256(src.read_bytes() + compiler.encode() + " ".join(flags).encode() + extra_key).hexdigest()[:16]
    path = cache_root() / "kernels" / f"{src.stem}-{key}.so"
    if not path.exists():
        try:
            with atomic_path(path) as tmp:
                subprocess.run([compiler, str(src), "-o", str(tmp), *flags], check=True, capture_output=True,
                               timeout=600)
        except (OSError, subprocess.SubprocessError):
            return None
    return path


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    path = _build(_which("CC", ("cc", "gcc", "clang")), _SRC, _CFLAGS)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.oag_dequant_int4_path.argtypes = [ctypes.c_int64]
    lib.oag_dequant_int4_path.restype = ctypes.c_int
    lib.oag_dequant_int4_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.oag_dequant_int4_bf16.restype = None
    lib.oag_dequant_int4_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
    lib.oag_dequant_int4_f32.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def dequant_path(group_size: int) -> str:
    """The code path this CPU takes for ``group_size``: 'avx512', 'avx2' or 'scalar' ('' without the library)."""
    lib = _library()
    return "" if lib is None else ("scalar", "avx2", "avx512")[lib.oag_dequant_int4_path(group_size)]


def dequant_int4_bf16(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                      out: torch.Tensor | None = None, path: int | None = None) -> torch.Tensor:
    """(N, K/2) uint8 codes, (N, K/g) bf16 scales and zeros -> (N, K) bf16 weights, written into ``out`` when
    given (a reused buffer spares the page faults of a fresh allocation on every call). ``path`` forces a code
    path (tests compare every path with the reference)."""
    return _dequant_int4(qweight, scales, zeros, group_size, out, path, torch.bfloat16)


def dequant_int4_f32(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     out: torch.Tensor | None = None, path: int | None = None) -> torch.Tensor:
    """As :func:`dequant_int4_bf16` with fp32 weights (not rounded): for CPUs without native bf16 arithmetic,
    where fp32 GEMMs are the fast ones."""
    return _dequant_int4(qweight, scales, zeros, group_size, out, path, torch.float32)


def _dequant_int4(qweight, scales, zeros, group_size, out, path, dtype) -> torch.Tensor:
    lib = _library()
    if lib is None:
        raise RuntimeError("the native kernels are not available (no working C compiler)")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dtype != torch.uint8 or scales.dtype != torch.bfloat16 or zeros.dtype != torch.bfloat16:
        raise TypeError("int4 dequantization takes uint8 codes and bf16 scales/zeros")
    if k % group_size or group_size % 2 or scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"shapes do not match: codes {tuple(qweight.shape)}, scales {tuple(scales.shape)}, "
                         f"group size {group_size}")
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if out is None:
        out = torch.empty(n, k, dtype=dtype)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n}, {k}) {dtype} tensor")
    best = lib.oag_dequant_int4_path(group_size)
    if path is None:
        path = best
    elif not 0 <= path <= best:
        raise ValueError(f"code path {path} is not available on this CPU for group size {group_size}")
    fn = lib.oag_dequant_int4_bf16 if dtype == torch.bfloat16 else lib.oag_dequant_int4_f32
    fn(qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), 0, n, k, group_size, path)
    return out


# --- torch operators (gemv.cpp): weight-only GEMVs for decode, callable from AOTInductor's compiled step ---

_OPS_SRC = Path(__file__).with_name("gemv.cpp")
_GGML_SRC = Path(__file__).with_name("ggml.cpp")  # GGML block formats, as the GGUF file stores them


def _ops_flags() -> list[str]:
    # torch's own headers and libraries (the paths torch.utils.cpp_extension would give; importing it costs ~0.2 s
    # at every start, and no build system is needed for one file)
    root = os.path.dirname(os.path.abspath(torch.__file__))
    inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
    abi = int(torch.compiled_with_cxx11_abi())
    return ["-O3", "-shared", "-fPIC", "-std=c++20", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
            f"-I{inc}", f"-I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}", f"-L{lib}", f"-Wl,-rpath,{lib}",
            "-lc10", "-ltorch_cpu"]


def sources_digest() -> str:
    """What every native kernel's speed depends on: the C and C++ sources (part of the autotune cache key)."""
    return hashlib.sha256(_SRC.read_bytes() + _OPS_SRC.read_bytes() + _GGML_SRC.read_bytes()).hexdigest()[:16]


def ops_digest() -> str:
    """What the operators' machine code and their C entry points depend on (part of the AOTInductor package key:
    packages call them)."""
    return hashlib.sha256(_OPS_SRC.read_bytes() + _GGML_SRC.read_bytes() + repr(_C_SHIMS).encode()
                          + torch.__version__.encode()).hexdigest()[:16]


# the C entry points gemv.cpp defines for AOTInductor (aoti_torch_cpu_<operator>; the schema's arguments in order,
# then the result's handle)
_C_SHIMS = {
    "int4_gemv": "AOTITorchError aoti_torch_cpu_int4_gemv(AtenTensorHandle x, AtenTensorHandle qweight, "
                 "AtenTensorHandle scales, AtenTensorHandle zeros, int64_t group_size, int64_t path, "
                 "AtenTensorHandle* ret0)",
    "int4_gemv_a8": "AOTITorchError aoti_torch_cpu_int4_gemv_a8(AtenTensorHandle x, AtenTensorHandle qweight, "
                    "AtenTensorHandle scales, AtenTensorHandle zeros, int64_t group_size, int64_t path, "
                    "AtenTensorHandle* ret0)",
    "int8_gemv": "AOTITorchError aoti_torch_cpu_int8_gemv(AtenTensorHandle x, AtenTensorHandle qweight, "
                 "AtenTensorHandle scales, int64_t path, AtenTensorHandle* ret0)",
    "decode_attention": "AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k, "
                        "AtenTensorHandle v, AtenTensorHandle mask, double* scale, int64_t path, "
                        "AtenTensorHandle* ret0)",
    "decode_attention_q8": "AOTITorchError aoti_torch_cpu_decode_attention_q8(AtenTensorHandle q, "
                           "AtenTensorHandle k, AtenTensorHandle k_scale, AtenTensorHandle v, "
                           "AtenTensorHandle v_scale, AtenTensorHandle mask, double* scale, int64_t path, "
                           "AtenTensorHandle* ret0)",
    "ggml_gemv": "AOTITorchError aoti_torch_cpu_ggml_gemv(AtenTensorHandle x, AtenTensorHandle raw, int64_t qtype, "
                 "int64_t K, int64_t path, AtenTensorHandle* ret0)",
    "ggml_rows": "AOTITorchError aoti_torch_cpu_ggml_rows(AtenTensorHandle raw, int64_t qtype, int64_t K, "
                 "AtenTensorHandle idx, AtenTensorHandle* ret0)",
    "ggml_dequant": "AOTITorchError aoti_torch_cpu_ggml_dequant(AtenTensorHandle raw, int64_t qtype, int64_t K, "
                    "int64_t bf16, int64_t path, AtenTensorHandle* ret0)",
}


def c_shims() -> dict:
    """``aot_inductor.custom_ops_to_c_shims`` for our operators: a package compiled with it calls them through
    their C entry points, not the proxy executor's boxed dispatch (~2.5 us a call, ~150 calls a decode step).
    Empty without the operators."""
    if not load_ops():
        return {}
    return {getattr(torch.ops.openautoglm, name).default: [decl] for name, decl in _C_SHIMS.items()}


@functools.lru_cache(maxsize=None)
def load_ops() -> bool:
    """Build (once per machine, ~15 s, into the cache) and load the ``openautoglm::`` operators. False where no
    C++ compiler works; callers then keep torch's kernels."""
    cxx = _which("CXX", ("c++", "g++", "clang++"))
    from concurrent.futures import ThreadPoolExecutor

    # the two sources compile in parallel (~15 s each, once per machine): a first start waits for one, not two
    with ThreadPoolExecutor(2) as ex:
        paths = list(ex.map(lambda src: _build(cxx, src, _ops_flags(), torch.__version__.encode()),
                            (_OPS_SRC, _GGML_SRC)))
    if None in paths:
        return False
    for path in paths:  # gemv.cpp defines the library, ggml.cpp adds to it
        # RTLD_GLOBAL: compiled packages resolve the operators' C entry points (c_shims) against these libraries
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        torch.ops.load_library(str(path))
    _register_fakes()
    return True


def _register_fakes() -> None:
    # shapes for torch.export / AOTInductor (the ops are pure: a new (M, N) bf16 tensor)
    @torch.library.register_fake("openautoglm::int4_gemv")
    def _(x, qweight, scales, zeros, group_size, path=-1):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("openautoglm::int4_gemv_a8")
    def _(x, qweight, scales, zeros, group_size, path=-1):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("openautoglm::int8_gemv")
    def _(x, qweight, scales, path=-1):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("openautoglm::ggml_gemv")
    def _(x, raw, qtype, K, path=-1):
        return x.new_empty(x.shape[0], raw.shape[0])

    @torch.library.register_fake("openautoglm::ggml_rows")
    def _(raw, qtype, K, idx):
        return raw.new_empty(idx.numel(), raw.shape[1])

    @torch.library.register_fake("openautoglm::ggml_dequant")
    def _(raw, qtype, K, bf16=0, path=-1):
        return raw.new_empty(raw.shape[0], K, dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.library.register_fake("openautoglm::decode_attention")
    def _(q, k, v, mask, scale=None, path=-1):
        return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])

    @torch.library.register_fake("openautoglm::decode_attention_q8")
    def _(q, k, k_scale, v, v_scale, mask, scale=None, path=-1):
        return q.new_empty(q.shape[0], q.shape[1], 1, q.shape[3])


def attention_path(head_dim: int) -> str:
    """The code path :func:`decode_attention` takes on this CPU for ``head_dim``: 'avx512', 'avx2' or 'scalar' ('' without
    the operators)."""
    if not load_ops():
        return ""
    return ("scalar", "avx2", "avx512")[torch.ops.openautoglm.decode_attention_path(head_dim)]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, path: int = -1) -> torch.Tensor:
    """Attention of one query position a row over the cache: q (B, H, 1, D), k/v (B, KV, S, D) fp32, bf16 or fp16
    (views of the cache: only the last dimension need be contiguous; more rows than B are allowed, and row b of q
    reads row b), mask (B or 1, 1, 1, S) bool -> (B, H, 1, D)
    in q's dtype. What ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)`` computes,
    with fp32 scores and softmax, over the slots up to the last allowed one only, each kv head's K and V read once
    for all of its query heads. A row whose mask allows nothing gives zeros (SDPA: NaN)."""
    return torch.ops.openautoglm.decode_attention(q, k, v, mask, scale, path)


def decode_attention_q8(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, v: torch.Tensor,
                        v_scale: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
                        path: int = -1) -> torch.Tensor:
    """:func:`decode_attention` over the int8 KV cache: k/v (B, KV, S, D) int8 codes, k_scale/v_scale (B, KV, S)
    fp16 (contiguous over slots); key j of a head is ``k[..., j, :] * k_scale[..., j]``, as is value j. The codes
    are read as they are stored (a quarter of fp32's bytes, half of fp16's)."""
    return torch.ops.openautoglm.decode_attention_q8(q, k, k_scale, v, v_scale, mask, scale, path)


def gemv_path(kind: str, arg: int) -> str:
    """The code path a call takes on this CPU: 'avx512', 'avx2' or 'scalar' ('' without the operators). ``kind`` is
    'int4' (``arg`` = group size), 'int8' (``arg`` = K; 'avx512vnni' where the CPU has it and K is a multiple of
    32: int16 activations) or 'int4-a8' ('avx512vnni' or 'avx2' where the CPU has it and ``arg`` is a multiple of
    32, else '': that operator has no scalar path)."""
    if not load_ops():
        return ""
    if kind == "int4-a8":
        return ("", "avx2", "avx512vnni")[torch.ops.openautoglm.int4_gemv_a8_path(arg)]
    if kind == "int8":
        return ("scalar", "avx2", "avx512", "avx512vnni")[torch.ops.openautoglm.int8_gemv_path(arg)]
    return ("scalar", "avx512")[torch.ops.openautoglm.int4_gemv_path(arg)]


#: ggml type name -> id, for the types ``ggml_gemv`` / ``ggml_dequant`` compute on as stored
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def ggml_gemv_path() -> str:
    """The path ``ggml_gemv`` takes on this CPU: 'avx512vnni', 'avx2' or 'scalar' ('' without the operators)."""
    if not load_ops():
        return ""
    return ("scalar", "avx2", "avx512vnni")[torch.ops.openautoglm.ggml_gemv_path()]


def ggml_dequant_path() -> str:
    """The path ``ggml_dequant`` takes on this CPU: 'avx512', 'avx2' or 'scalar' ('' without the operators)."""
    if not load_ops():
        return ""
    return ("scalar", "avx2", "avx512")[torch.ops.openautoglm.ggml_dequant_path()]


#: the block types that have the 16-row interleaved layout (``ggml_interleave``); a type id | ``X16`` names it
X16_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")
X16, X16_ROWS = 256, 16


def ggml_type_id(qtype: str, interleaved: bool = False) -> int:
    return GGML_TYPES[qtype] | (X16 if interleaved else 0)


def interleaves(qtype: str, rows: int) -> bool:
    """Whether (rows, K) blocks of ``qtype`` are best held interleaved here: where ``ggml_gemv`` runs AVX-512 VNNI
    (the only path that computes on that layout) and the rows come in whole groups of 16."""
    return qtype in X16_TYPES and rows % X16_ROWS == 0 and ggml_gemv_path() == "avx512vnni"


def ggml_interleave(raw: torch.Tensor, qtype: str, K: int, inplace: bool = False) -> torch.Tensor:
    """(N, bytes a row) stored blocks -> the same bytes in the 16-row interleaved layout (kernels/ggml.cpp): a
    copy, or ``raw`` itself rearranged (``inplace``: no second copy of the weights exists at any time)."""
    _require_ops()
    out = raw if inplace else raw.contiguous().clone()
    torch.ops.openautoglm.ggml_interleave_(out, GGML_TYPES[qtype], K)
    return out


def ggml_rows(raw: torch.Tensor, qtype: str, K: int, idx: torch.Tensor | None = None,
              interleaved: bool = False) -> torch.Tensor:
    """Rows ``idx`` (all by default) of (N, bytes a row) blocks, as the GGUF file stores them."""
    _require_ops()
    idx = torch.arange(raw.shape[0]) if idx is None else idx
    return torch.ops.openautoglm.ggml_rows(raw, ggml_type_id(qtype, interleaved), K, idx)


def ggml_gemv(x: torch.Tensor, raw: torch.Tensor, qtype: str, K: int, path: int = -1,
              interleaved: bool = False) -> torch.Tensor:
    """(M, K) fp32/bf16 activations x GGML block weights ``raw`` (N, bytes a row, as the GGUF file stores them,
    or ``interleaved``) -> (M, N) in x's dtype. The activations are quantized to int8 per block of 32 and each
    weight block is dotted in integers (llama.cpp's arithmetic); ``path`` forces 0 (scalar), 1 (AVX2) or 2
    (AVX512-VNNI, the only one for the interleaved layout)."""
    _require_ops()
    return torch.ops.openautoglm.ggml_gemv(x, raw, ggml_type_id(qtype, interleaved), K, path)


def ggml_dequant(raw: torch.Tensor, qtype: str, K: int, dtype: torch.dtype = torch.float32,
                 path: int = -1, out: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    """GGML block weights (N, bytes a row) -> (N, K) fp32 (bit for bit gguf-py's ``dequantize``) or bf16 (that,
    rounded to nearest even). ``path`` forces 0 (scalar), 1 (AVX2) or 2 (AVX-512). ``out``: a contiguous (N, K) fp32 or bf16
    tensor to write (its dtype wins over ``dtype``), returned."""
    _require_ops()
    tid = ggml_type_id(qtype, interleaved)
    if out is not None:
        torch.ops.openautoglm.ggml_dequant_out(raw, tid, K, out, path)
        return out
    return torch.ops.openautoglm.ggml_dequant(raw, tid, K, int(dtype == torch.bfloat16), path)


def _require_ops() -> None:
    if not load_ops():
        raise RuntimeError("the native operators are not available (no working C++ compiler)")


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              path: int = -1) -> torch.Tensor:
    """(M, K) bf16 activations x int4 per-group weights in the portable layout -> (M, N) bf16, fp32 accumulation.
    Streams the codes once per activation row: for decode's few rows."""
    return torch.ops.openautoglm.int4_gemv(x, qweight, scales, zeros, group_size, path)


def int4_gemv_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, path: int = -1) -> torch.Tensor:
    """As :func:`int4_gemv` with the activations quantized to int8 per block of 8 (``d = max|x| / 127``,
    ``round(x * 127 / max|x|)``; llama.cpp's Q8 activations use blocks of 32) and integer dot products
    (AVX512-VNNI, or AVX2's vpmaddubsw): the exact product of the dequantized weights with the quantized
    activations, in fp32, rounded once to bf16. About 2x the bf16-activation kernel's throughput per core. Only
    where ``gemv_path('int4-a8', group_size)`` is not ''; ``path`` forces 1 (AVX2) or 2 (AVX512-VNNI)."""
    return torch.ops.openautoglm.int4_gemv_a8(x, qweight, scales, zeros, group_size, path)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, path: int = -1) -> torch.Tensor:
    """(M, K) bf16 activations x int8 per-channel weights (N, K), scales (N,) bf16 -> (M, N) bf16. Paths 1-2
    (AVX2, AVX-512) take the activations exactly (fp32); path 3 (AVX512-VNNI, K a multiple of 32) quantizes each
    activation row to int16 with one scale (``d = max|x| / 16383``, round half to even) and computes the exact
    integer dot product, scaled once: ~3x fewer vector operations per weight."""
    return torch.ops.openautoglm.int8_gemv(x, qweight, scales, path)
