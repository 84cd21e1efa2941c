"""Native kernels against their torch references, bit for bit (``openautoglm.kernels``)."""

import pytest
import torch

from openautoglm import kernels
from openautoglm.compiler.impls import DequantBF16Linear, DequantF32Linear
from openautoglm.quant import primitives as P
from openautoglm.quant.config import IntxWeightOnlyConfig
from openautoglm.quant.modules import IntxLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the native kernels are off")

PATHS = {"scalar": 0, "avx2": 1, "avx512": 2}


def _paths(group: int) -> list[int]:
    return list(range(PATHS[kernels.dequant_path(group)] + 1))


def _reference_bf16(m: IntxLinear) -> torch.Tensor:
    return P.dequant_asym(m.codes(), m.scales, m.zeros, 4).to(torch.bfloat16)


@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])  # 16: the AVX2 path's smallest step
@pytest.mark.parametrize("shape", [(3, 256), (130, 512), (67, 1536)])
def test_dequant_int4_matches_the_torch_reference_bit_for_bit(group, shape):
    g = torch.Generator().manual_seed(group + shape[0])
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[0])[:, None]  # scales over 6 decades
    w[0, :group] = 0.0  # a constant group
    q, s, z = P.asym_per_group(w, 4, group)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    ref = P.dequant_asym(q, s, z, 4).to(torch.bfloat16)
    for path in _paths(group):
        out = kernels.dequant_int4_bf16(P.pack_bits(q, 4), s, z, group, path=path)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"path {path}"


@pytest.mark.parametrize("group", [16, 32, 256])
def test_dequant_int4_f32_is_the_torch_reference_bit_for_bit(group):
    g = torch.Generator().manual_seed(group)
    w = torch.randn(67, 512, generator=g) * torch.logspace(-4, 2, 67)[:, None]
    q, s, z = P.asym_per_group(w, 4, group)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    ref = P.dequant_asym(q, s, z, 4)
    assert ref.dtype == torch.float32
    for path in _paths(group):
        out = kernels.dequant_int4_f32(P.pack_bits(q, 4), s, z, group, path=path)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), f"path {path}"
    with pytest.raises(ValueError):  # a bf16 buffer for fp32 weights
        kernels.dequant_int4_f32(P.pack_bits(q, 4), s, z, group, out=torch.empty(67, 512, dtype=torch.bfloat16))


def test_dequant_int4_every_code_and_rounding_tie():
    # every code 0..15 against bf16 scales/zeros whose products land between bf16 values (ties included)
    n, k, group = 64, 512, 32
    codes = torch.arange(n * k).remainder(16).reshape(n, k).to(torch.uint8)
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(n, k // group, generator=g) * 3 + 1e-3).to(torch.bfloat16)
    z = (torch.randn(n, k // group, generator=g) * 5).to(torch.bfloat16)
    s[0, 0], z[0, 0] = 1.0 + 2 ** -7, 2 ** -8  # (q - 8) * s + z halfway between bf16 neighbours for some q
    m = IntxLinear(codes, s, z, 4, group, None)
    ref = _reference_bf16(m)
    for path in _paths(group):
        out = kernels.dequant_int4_bf16(m.qweight, m.scales, m.zeros, group, path=path)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"path {path}"


def test_dequant_int4_writes_into_a_reused_buffer_and_rejects_bad_input():
    m = IntxLinear.from_weight(torch.randn(40, 128), None, IntxWeightOnlyConfig(4, 32))
    buf = torch.full((40, 128), float("nan"), dtype=torch.bfloat16)
    out = kernels.dequant_int4_bf16(m.qweight, m.scales, m.zeros, 32, out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, _reference_bf16(m))
    with pytest.raises(ValueError):
        kernels.dequant_int4_bf16(m.qweight, m.scales, m.zeros, 64)  # scales are per 32
    with pytest.raises(ValueError):
        kernels.dequant_int4_bf16(m.qweight, m.scales, m.zeros, 32, out=torch.empty(40, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        kernels.dequant_int4_bf16(m.qweight, m.scales.float(), m.zeros, 32)


def test_dequantizing_gemm_equals_a_bf16_gemm_on_the_reference_weights():
    m = IntxLinear.from_weight(torch.randn(96, 256), torch.randn(96), IntxWeightOnlyConfig(4, 64))
    x = torch.randn(2, 33, 256)
    ref = torch.nn.functional.linear(x.bfloat16(), _reference_bf16(m), m.bias.bfloat16()).float()
    out = DequantBF16Linear(m)(x)
    assert out.dtype == x.dtype and torch.equal(out, ref)
    # the fp32 variant: an fp32 GEMM on the unrounded reference weights
    ref32 = torch.nn.functional.linear(x, P.dequant_asym(m.codes(), m.scales, m.zeros, 4), m.bias)
    out32 = DequantF32Linear(m)(x)
    assert out32.dtype == x.dtype and torch.equal(out32, ref32)


# --- decode GEMV operators (kernels/gemv.cpp) against the dequantize-then-matmul reference ---

def _ops():
    if not kernels.load_ops():
        pytest.skip("no C++ compiler: the GEMV operators are off")


def _close_to_bf16_rounding(out: torch.Tensor, ref: torch.Tensor):
    # fp32 accumulation, then one rounding to bf16: within a bf16 half-ulp of the exact result, plus the fp32 sum's
    # own error (orders of magnitude smaller, bounded here by the sum of |terms|)
    err = (out.double() - ref).abs()
    assert out.dtype == torch.bfloat16
    assert bool((err <= ref.abs() * 2 ** -8 + 1e-5 * ref.abs().max()).all()), float(err.max())


@pytest.mark.parametrize("group,shape", [(16, (37, 576)), (32, (37, 576)), (64, (130, 576)), (32, (130, 1536)),
                                         (128, (37, 1536)), (256, (130, 1536))])  # 16: the scalar path only
@pytest.mark.parametrize("rows", [1, 3])  # 37, 130 rows: not a multiple of the 4-row step
def test_int4_gemv_matches_the_dequantized_reference(group, shape, rows):
    _ops()
    g = torch.Generator().manual_seed(group + shape[0] + rows)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    q, s, z = P.asym_per_group(w, 4, group)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    x = (torch.randn(rows, shape[1], generator=g) * 3).to(torch.bfloat16)
    x[:, ::97] *= 20  # outlier channels
    ref = x.double() @ P.dequant_asym(q, s, z, 4).double().t()
    best = {"scalar": 0, "avx512": 1}[kernels.gemv_path("int4", group)]
    for path in range(best + 1):
        _close_to_bf16_rounding(kernels.int4_gemv(x, P.pack_bits(q, 4), s, z, group, path=path), ref)


def _a8_reference(x: torch.Tensor) -> torch.Tensor:
    # int8 activations (llama.cpp's Q8 with blocks of 8), in the operator's own fp32 steps: per block of 8,
    # d = max|x| / 127, q = round-half-even(x * (127 / max|x|)); returned dequantized (q * d, exact in float64)
    xb = x.float().view(x.shape[0], -1, 8)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    assert q.abs().max() <= 127
    return (q.double() * (amax / 127).double()).view(x.shape)


@pytest.mark.parametrize("group,shape", [(32, (37, 576)), (64, (130, 576)), (32, (130, 1536)), (128, (37, 1536)),
                                         (256, (130, 1536)), (32, (9, 96)),  # K=576, 96: a partial last chunk
                                         (96, (37, 576)), (192, (37, 1536)),  # groups of 3 and 6 blocks of 32
                                         (32, (37, 544))])  # a last chunk of 1 block (576: 2, 96: 3)
@pytest.mark.parametrize("rows", [1, 3])
def test_int4_gemv_a8_is_the_dequantized_weights_times_the_quantized_activations(group, shape, rows):
    _ops()
    best = {"": 0, "avx2": 1, "avx512vnni": 2}[kernels.gemv_path("int4-a8", group)]
    if not best:
        pytest.skip("this CPU has neither AVX2 nor AVX512-VNNI")
    g = torch.Generator().manual_seed(group + shape[0] + rows)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    q, s, z = P.asym_per_group(w, 4, group)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    x = (torch.randn(rows, shape[1], generator=g) * 3).to(torch.bfloat16)
    x[:, ::97] *= 20  # outlier channels
    x[-1, 32:64] = 0  # all-zero blocks (d = 0)
    xq = _a8_reference(x)
    wd = P.dequant_asym(q, s, z, 4).double()
    ref = xq @ wd.t()
    # one bf16 rounding of an fp32 sum whose terms (s q x and (z - 8 s) x) are bounded by `terms`
    sr, zr = (t.double().repeat_interleave(group, 1) for t in (s, z))
    terms = xq.abs() @ (23 * sr.abs() + zr.abs()).t()
    tol = ref.abs() * 2 ** -8 + 1e-5 * terms
    for path in range(1, best + 1):  # every code path this CPU has
        out = kernels.int4_gemv_a8(x, P.pack_bits(q, 4), s, z, group, path=path)
        assert out.dtype == torch.bfloat16
        err = (out.double() - ref).abs()
        assert bool((err <= tol).all()), (path, float(err.max()))
    # and the check tells it from the bf16-activation product (the quantization is really applied)
    assert bool(((x.double() @ wd.t() - ref).abs() > tol).any())


def _a16_reference(x: torch.Tensor) -> torch.Tensor:
    # int16 activations, one scale a row, in the operator's own fp32 steps: d = max|x| / 16383,
    # q = round-half-even(x * (16383 / max|x|)); returned dequantized (q * d, exact in float64)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    q = torch.round(xf * torch.where(amax > 0, 16383 / amax, torch.zeros_like(amax)))
    assert q.abs().max() <= 16383
    return q.double() * (amax / 16383).double()


# K=8224: two int32 segments on the VNNI path; K=24: not a multiple of 16, the scalar path only
@pytest.mark.parametrize("shape", [(37, 576), (1029, 1536), (9, 8224), (5, 24)])
def test_int8_gemv_matches_the_dequantized_reference(shape):
    _ops()
    from openautoglm.quant.modules import Int8Linear

    g = torch.Generator().manual_seed(shape[0])
    m = Int8Linear(*P.int8_per_channel(torch.randn(shape, generator=g)), None)
    x = torch.randn(2, shape[1], generator=g).to(torch.bfloat16)
    x[:, ::97] *= 20  # outlier channels
    x[1, :] = 0  # an all-zero row (d = 0)
    wd = m.dequantized().double()
    ref = x.double() @ wd.t()
    best = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3}[kernels.gemv_path("int8", shape[1])]
    for path in range(min(best, 2) + 1):  # bf16 activations taken exactly
        _close_to_bf16_rounding(kernels.int8_gemv(x, m.qweight, m.scales, path=path), ref)
    if best == 3:  # int16 activations: the exact product with them, rounded once
        ref16 = _a16_reference(x) @ wd.t()
        _close_to_bf16_rounding(kernels.int8_gemv(x, m.qweight, m.scales, path=3), ref16)
        assert not torch.equal(_a16_reference(x), x.double())  # the quantization is really applied


def test_gemv_rejects_bad_input():
    _ops()
    m = IntxLinear.from_weight(torch.randn(8, 64), None, IntxWeightOnlyConfig(4, 32))
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.int4_gemv(torch.randn(1, 64), m.qweight, m.scales, m.zeros, 32)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.int4_gemv(torch.randn(1, 32).bfloat16(), m.qweight, m.scales, m.zeros, 32)
    with pytest.raises(RuntimeError, match="group size"):
        kernels.int4_gemv(torch.randn(1, 64).bfloat16(), m.qweight, m.scales, m.zeros, 48)
    if kernels.gemv_path("int4-a8", 32):
        with pytest.raises(RuntimeError, match="bf16"):
            kernels.int4_gemv_a8(torch.randn(1, 64), m.qweight, m.scales, m.zeros, 32)
        s16 = torch.ones(8, 4, dtype=torch.bfloat16)  # group size 16: no path
        with pytest.raises(RuntimeError, match="multiple of 32"):
            kernels.int4_gemv_a8(torch.randn(1, 64).bfloat16(), m.qweight, s16, s16, 16)
        with pytest.raises(RuntimeError, match="code path"):
            kernels.int4_gemv_a8(torch.randn(1, 64).bfloat16(), m.qweight, m.scales, m.zeros, 32, path=3)


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _close_to_rounding(out: torch.Tensor, ref: torch.Tensor, fp32_rel: float = 1e-6):
    # fp32 scores, softmax and sums, then one rounding to the output dtype
    ulp = {F32: 0.0, BF16: 2 ** -8, F16: 2 ** -11}[out.dtype]
    err = (out.double() - ref).abs()
    assert bool((err <= ref.abs() * ulp + fp32_rel * max(1.0, float(ref.abs().max()))).all()), float(err.max())


@pytest.mark.parametrize("qdt,kvdt", [(F32, F32), (BF16, BF16), (F16, F16), (F32, F16), (F32, BF16)])
@pytest.mark.parametrize("B,H,KV,S,D", [(1, 9, 3, 384, 64),  # SmolLM2: 3 query heads a kv head
                                        (2, 14, 2, 200, 64),  # 7 a kv head: groups of 4 and 3
                                        (3, 16, 1, 37, 128),  # 16: four groups of 4
                                        (2, 5, 1, 133, 32),  # 5: groups of 3 and 2
                                        (2, 4, 4, 19, 72)])  # D = 72: not a multiple of 16, scalar only
def test_decode_attention_matches_sdpa(qdt, kvdt, B, H, KV, S, D):
    _ops()
    g = torch.Generator().manual_seed(S + D)
    # k/v: views of a longer cache (strided); q: a transpose, as the model makes it
    kc, vc = (torch.randn(B, KV, S + 7, D, generator=g).to(kvdt) for _ in range(2))
    k, v = kc[:, :, :S], vc[:, :, :S]
    q = torch.randn(B, 1, H, D, generator=g).to(qdt).transpose(1, 2)
    pos = torch.randint(2, S, (B, 1), generator=g)
    pos[0] = S - 1
    mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, 1, S)
    mask[-1, ..., : int(pos[-1]) // 2] = False  # the last row does not attend its first half (whole chunks)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                           enable_gqa=True)
    # stale values in the slots the mask excludes must not leak (SDPA itself would give NaN here)
    hidden = ~mask.expand(B, KV, 1, S)[:, :, 0]  # (B, KV, S)
    k[hidden], v[hidden] = float("nan"), float("nan")
    best = {"scalar": 0, "avx2": 1, "avx512": 2}[kernels.attention_path(D)]
    for path in range(best + 1):
        out = kernels.decode_attention(q, k, v, mask, path=path)
        assert out.shape == (B, H, 1, D) and out.dtype == qdt
        _close_to_rounding(out, ref)
    if B > 1:  # a planned cache with more rows than the step runs (row b reads row b)
        assert torch.equal(kernels.decode_attention(q[:1], k, v, mask[:1]), kernels.decode_attention(q, k, v, mask)[:1])
    # a mask broadcast over rows, and an explicit scale
    m1 = torch.ones(1, 1, 1, S, dtype=torch.bool)
    kc.nan_to_num_(0.0), vc.nan_to_num_(0.0)
    ref1 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m1,
                                                            scale=0.3, enable_gqa=True)
    _close_to_rounding(kernels.decode_attention(q, k, v, m1, scale=0.3), ref1)


@pytest.mark.parametrize("qdt", [F32, BF16])
@pytest.mark.parametrize("B,H,KV,S,D", [(1, 9, 3, 384, 64), (2, 14, 2, 200, 64), (3, 16, 1, 37, 128),
                                        (2, 4, 4, 19, 72)])
def test_decode_attention_q8_is_sdpa_over_the_dequantized_cache(qdt, B, H, KV, S, D):
    """The int8 cache's attention reads the codes and scales as stored: it is SDPA over codes x scales."""
    from openautoglm.runtime.kv_cache import dequantize_kv, quantize_kv

    _ops()
    g = torch.Generator().manual_seed(S + D + 1)
    kc, vc = (torch.randn(B, KV, S + 7, D, generator=g) * 3 for _ in range(2))
    kc[..., 5] += 20  # an outlier channel, as Qwen's keys have
    (k8, ks), (v8, vs) = quantize_kv(kc), quantize_kv(vc)
    k8, ks, v8, vs = k8[:, :, :S], ks[:, :, :S], v8[:, :, :S], vs[:, :, :S]  # views of a longer cache
    q = torch.randn(B, 1, H, D, generator=g).to(qdt).transpose(1, 2)
    pos = torch.randint(2, S, (B, 1), generator=g)
    pos[0] = S - 1
    mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]
    mask[-1, ..., : int(pos[-1]) // 2] = False
    k, v = dequantize_kv(k8, ks, torch.float64), dequantize_kv(v8, vs, torch.float64)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask, enable_gqa=True)
    # stale slots the mask hides must not leak: NaN scales there
    hidden = ~mask.expand(B, KV, 1, S)[:, :, 0]
    ks[hidden], vs[hidden] = float("nan"), float("nan")
    best = {"scalar": 0, "avx2": 1, "avx512": 2}[kernels.attention_path(D)]
    for path in range(best + 1):
        out = kernels.decode_attention_q8(q, k8, ks, v8, vs, mask, path=path)
        assert out.shape == (B, H, 1, D) and out.dtype == qdt
        _close_to_rounding(out, ref, fp32_rel=4e-6)  # (scores up to ~10 here: fp32's exp of them)
    if B > 1:
        assert torch.equal(kernels.decode_attention_q8(q[:1], k8, ks, v8, vs, mask[:1]),
                           kernels.decode_attention_q8(q, k8, ks, v8, vs, mask)[:1])
    with pytest.raises(RuntimeError, match="int8"):
        kernels.decode_attention_q8(q, k8.float(), ks, v8, vs, mask)
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.decode_attention_q8(q, k8, ks.float(), v8, vs, mask)


def test_kv_quantization_is_symmetric_int8_per_token_and_head():
    """Each (token, head) vector: scale = max|x| / 127 (fp16), codes = round(x / scale) in [-127, 127]; the
    round trip is within half a step (of the fp16 scale), and an all-zero vector stays zero."""
    from openautoglm.runtime.kv_cache import dequantize_kv, quantize_kv

    x = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    x[0, 0, 7] = 0.0
    codes, scales = quantize_kv(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == x.shape[:-1]
    assert int(codes.abs().max()) == 127 and bool(((codes.abs().amax(-1) >= 126) | (scales == 0)).all())
    err = (dequantize_kv(codes, scales, torch.float64) - x.double()).abs()
    assert bool((err <= scales.double()[..., None] / 2 * (1 + 1e-6)).all())
    assert bool((codes[0, 0, 7] == 0).all()) and float(scales[0, 0, 7]) == 0.0
    # bf16 input: the same codes as its fp32 value
    assert torch.equal(quantize_kv(x.bfloat16())[0], quantize_kv(x.bfloat16().float())[0])


def test_decode_attention_rejects_bad_input():
    _ops()
    q, k, mask = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.ones(1, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="q must be"):
        kernels.decode_attention(torch.randn(1, 4, 2, 16), k, k, mask)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernels.decode_attention(q, k, k.bfloat16(), mask)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.decode_attention(torch.randn(1, 3, 1, 16), k, k, mask)
    with pytest.raises(RuntimeError, match="mask must be"):
        kernels.decode_attention(q, k, k, mask.float())
    with pytest.raises(RuntimeError, match="last dimension"):
        kt = torch.randn(1, 2, 16, 8).transpose(2, 3)  # (1, 2, 8, 16), strided along D
        kernels.decode_attention(q, kt, kt, mask)
