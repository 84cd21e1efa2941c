"""The GGML block-format operators (kernels/ggml.cpp) against gguf-py: the dequantization bit for bit, and the
GEMV against the exact product of gguf-py's dequantized weights with the int8-quantized activations it states."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from openautoglm import kernels
from openautoglm.formats.gguf_quants import BLOCK_SIZES

pytestmark = pytest.mark.skipif(not kernels.load_ops(), reason="no C++ compiler: the native operators are off")

TYPES = list(kernels.GGML_TYPES)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208]}


def random_rows(qtype: str, N: int, K: int, seed: int = 0) -> torch.Tensor:
    """(N, bytes a row) of random blocks whose fp16 fields hold finite values of realistic size (every other byte
    pattern is a valid block: codes, packed scales, high bits)."""
    rng = np.random.default_rng(seed)
    block, tsize = BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N, K // block, tsize), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = (rng.standard_normal((N, K // block)) * 0.01).astype(np.float16).view(
            np.uint8).reshape(N, K // block, 2)
    return torch.from_numpy(raw.reshape(N, -1))


def gguf_py(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw.numpy(), GGMLQuantizationType[qtype]).astype(np.float32))


def quantize_x(x: torch.Tensor, qb: int):
    """What the GEMV states it does to the activations: per block of ``qb`` (32; 256 for the K-quants, as
    llama.cpp's Q8_K), d = max|x| / 127 and q = round_half_even(x * (127 / max|x|)), in fp32."""
    M, K = x.shape
    xb = x.reshape(M, K // qb, qb)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round((xb * inv).clamp(-127, 127))
    return q.reshape(M, K), (amax / 127).expand(-1, -1, qb).reshape(M, K)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequant_is_gguf_py_bit_for_bit_on_every_path(qtype):
    raw = random_rows(qtype, 40, 512)
    ref = gguf_py(raw, qtype)
    for path in range(("scalar", "avx2", "avx512").index(kernels.ggml_dequant_path()) + 1):
        out = kernels.ggml_dequant(raw, qtype, 512, path=path)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), (qtype, path)
        assert torch.equal(kernels.ggml_dequant(raw, qtype, 512, torch.bfloat16, path=path), ref.to(torch.bfloat16))
        # into a caller's buffer (prefill's reused workspace), over whatever it held before
        for dt in (torch.float32, torch.bfloat16):
            buf = torch.full((40, 512), float("nan"), dtype=dt)
            assert kernels.ggml_dequant(raw, qtype, 512, path=path, out=buf) is buf
            assert torch.equal(buf, ref.to(dt)), (qtype, path, dt)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_dequant_of_gguf_py_quantized_weights(qtype):
    """Blocks from gguf-py's own quantizer (real codes, not random bytes)."""
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32) * 0.05
    raw = torch.from_numpy(quants.quantize(w, GGMLQuantizationType[qtype]))
    assert torch.equal(kernels.ggml_dequant(raw, qtype, 256), gguf_py(raw, qtype))


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("M", [1, 3, 6, 9])
def test_gemv_is_the_dequantized_weights_times_the_quantized_activations(qtype, M):
    K = 768 if BLOCK_SIZES[qtype][0] == 256 else 544  # K=544: 17 blocks, an odd count
    if K % BLOCK_SIZES[qtype][0]:
        K = 512
    N = 67  # an odd row count: the 2-row loop's tail
    raw = random_rows(qtype, N, K, seed=3)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4))
    x[:, 5] *= 30  # an outlier channel
    q, d = quantize_x(x, 256 if qtype.endswith("_K") else 32)
    exact = (q.double() * d.double()) @ gguf_py(raw, qtype).double().T  # every product exact in float64
    scale = (q.double().abs() * d.double()) @ gguf_py(raw, qtype).double().abs().T  # the terms' magnitude
    best = {"scalar": 0, "avx2": 1, "avx512vnni": 2}[kernels.ggml_gemv_path()]
    for path in range(best + 1):
        y = kernels.ggml_gemv(x, raw, qtype, K, path=path)
        assert y.shape == (M, N) and y.dtype == torch.float32
        err = (y.double() - exact).abs()
        assert bool((err <= 1e-5 * scale + 1e-7).all()), (qtype, path, float((err / (scale + 1e-9)).max()))
        # rows are independent: a batch is its rows one by one
        assert torch.equal(torch.cat([kernels.ggml_gemv(x[i:i + 1], raw, qtype, K, path=path) for i in range(M)]), y)
    yb = kernels.ggml_gemv(x.to(torch.bfloat16), raw, qtype, K)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("qtype", kernels.X16_TYPES)
def test_interleaved_layout_holds_the_stored_bytes_and_computes_what_they_do(qtype):
    """The 16-row interleaved layout (the AVX-512 VNNI GEMV's): the stored rows come back out of it byte for byte,
    its dequantization is gguf-py's bit for bit, and its GEMV is the exact product within the stated rounding,
    a batch bit for bit its rows one by one (tiles of 16, 8, 4, 2 and 1 rows)."""
    N, K = 48, 768 if qtype.endswith("_K") else 544  # 3 groups of 16 rows; 3 or 17 blocks
    raw = random_rows(qtype, N, K, seed=5)
    xr = kernels.ggml_interleave(raw, qtype, K)
    assert not torch.equal(xr, raw) and xr.shape == raw.shape
    assert torch.equal(kernels.ggml_rows(xr, qtype, K, interleaved=True), raw)
    idx = torch.tensor([47, 0, 17, 17, 31])
    assert torch.equal(kernels.ggml_rows(xr, qtype, K, idx, interleaved=True), raw[idx])
    ref = gguf_py(raw, qtype)
    for path in range(("scalar", "avx2", "avx512").index(kernels.ggml_dequant_path()) + 1):
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(kernels.ggml_dequant(xr, qtype, K, dt, path=path, interleaved=True), ref.to(dt))
    if kernels.ggml_gemv_path() != "avx512vnni":
        with pytest.raises(RuntimeError, match="interleaved layout runs on the AVX-512 VNNI path only"):
            kernels.ggml_gemv(torch.randn(1, K), xr, qtype, K, interleaved=True)
        return
    x = torch.randn(31, K, generator=torch.Generator().manual_seed(6))
    x[:, 9] *= 30
    q, d = quantize_x(x, 256 if qtype.endswith("_K") else 32)
    exact = (q.double() * d.double()) @ ref.double().T
    scale = (q.double().abs() * d.double()) @ ref.double().abs().T
    y = kernels.ggml_gemv(x, xr, qtype, K, interleaved=True)
    err = (y.double() - exact).abs()
    assert bool((err <= 1e-5 * scale + 1e-7).all()), (qtype, float((err / (scale + 1e-9)).max()))
    assert torch.equal(torch.cat([kernels.ggml_gemv(x[i:i + 1], xr, qtype, K, interleaved=True) for i in range(31)]), y)
    with pytest.raises(RuntimeError, match="groups of 16"):
        kernels.ggml_gemv(x, xr[:40], qtype, K, interleaved=True)


@pytest.mark.skipif(kernels.ggml_gemv_path() != "avx512vnni", reason="the interleaved GEMV runs on AVX-512 VNNI")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_interleaved_gemm_in_l2_chunks_of_rows_is_its_rows_one_by_one(qtype):
    """A prefill's activation rows pass the weights in chunks sized to L2 (32 rows at K = 8960): a batch that
    spans chunks and ends in a partial tile is still bit for bit its rows one by one, and the exact product."""
    N, K, M = 32, 8960, 45
    raw = random_rows(qtype, N, K, seed=7)
    xr = kernels.ggml_interleave(raw, qtype, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(8))
    y = kernels.ggml_gemv(x, xr, qtype, K, interleaved=True)
    assert torch.equal(torch.cat([kernels.ggml_gemv(x[i:i + 1], xr, qtype, K, interleaved=True) for i in range(M)]), y)
    q, d = quantize_x(x, 256 if qtype.endswith("_K") else 32)
    ref = gguf_py(raw, qtype).double()
    exact = (q.double() * d.double()) @ ref.T
    scale = (q.double().abs() * d.double()) @ ref.abs().T
    assert bool(((y.double() - exact).abs() <= 1e-5 * scale + 1e-7).all())


def test_gemv_and_dequant_reject_bad_input():
    raw = random_rows("Q8_0", 4, 64)
    with pytest.raises(RuntimeError, match="multiple of the block size"):
        kernels.ggml_gemv(torch.randn(1, 48), raw[:, :51], "Q8_0", 48)
    with pytest.raises(RuntimeError, match="raw must be"):
        kernels.ggml_gemv(torch.randn(1, 64), raw[:, :40], "Q8_0", 64)
    with pytest.raises(RuntimeError, match="x must be"):
        kernels.ggml_gemv(torch.randn(1, 32), raw, "Q8_0", 64)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        kernels.ggml_gemv(torch.randn(1, 64).double(), raw, "Q8_0", 64)
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.openautoglm.ggml_dequant(raw, 10, 64, 0)  # Q2_K
    for bad in (torch.empty(4, 32), torch.empty(4, 64, dtype=torch.float16), torch.empty(64, 4).t()):
        with pytest.raises(RuntimeError, match="out must be"):
            kernels.ggml_dequant(raw, "Q8_0", 64, out=bad)


def test_prefill_through_the_reused_workspace_is_the_fresh_dequantization():
    """Layers of different shapes share one buffer per thread: each prefill-sized call (more than GEMV_MAX_ROWS
    rows) gives what dequantizing into a fresh tensor gives, whatever the buffer last held."""
    from openautoglm.quant import modules as QM

    layers = [QM.GGMLLinear(random_rows(q, n, k, seed=n), q, k, None)
              for q, n, k in (("Q4_K", 96, 512), ("Q6_K", 40, 768), ("Q8_0", 200, 256))]
    x = {k: torch.randn(QM.GEMV_MAX_ROWS + 3, k, generator=torch.Generator().manual_seed(k)) for k in (256, 512, 768)}
    ws = [[m(x[m.in_features]) for m in layers] for _ in range(2)]
    old = QM.WORKSPACE_MAX
    QM.WORKSPACE_MAX = 0  # every call allocates
    try:
        fresh = [m(x[m.in_features]) for m in layers]
    finally:
        QM.WORKSPACE_MAX = old
    for a, b, c in zip(ws[0], ws[1], fresh):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_layer_holds_the_interleaved_layout_where_the_gemv_computes_on_it():
    """A GGMLLinear takes the 16-row layout exactly where ``kernels.interleaves`` says (AVX-512 VNNI, whole
    groups), leaves a caller's tensor alone unless it is ``owned``, and still gives the stored rows, the embedding
    rows and the concatenation (fused q/k/v, gate/up) of the file's bytes."""
    from openautoglm.quant.modules import GGMLLinear, cat_rows

    raw = random_rows("Q5_0", 64, 256, seed=7)
    keep = raw.clone()
    layer = GGMLLinear(raw, "Q5_0", 256, None)
    assert layer.interleaved == kernels.interleaves("Q5_0", 64)
    assert torch.equal(raw, keep) and torch.equal(layer.stored_rows(), raw)
    idx = torch.tensor([[3, 60], [16, 15]])
    assert torch.equal(layer.dequantize_rows(idx), gguf_py(raw, "Q5_0")[idx])
    assert torch.equal(layer.dequantized(), gguf_py(raw, "Q5_0"))
    owned = GGMLLinear(raw, "Q5_0", 256, None, owned=True)
    assert (owned.raw.data_ptr() == raw.data_ptr()) and torch.equal(owned.stored_rows(), keep)
    other = random_rows("Q5_0", 32, 256, seed=8)
    fused = cat_rows([GGMLLinear(keep, "Q5_0", 256, None), GGMLLinear(other, "Q5_0", 256, None)])
    assert fused.interleaved == layer.interleaved and torch.equal(fused.stored_rows(), torch.cat([keep, other]))
    assert not GGMLLinear(random_rows("Q5_0", 40, 256), "Q5_0", 256, None).interleaved  # not whole groups
    assert not GGMLLinear(random_rows("Q5_K", 64, 256), "Q5_K", 256, None).interleaved  # no such layout


@pytest.mark.skipif(kernels.ggml_gemv_path() != "avx512vnni", reason="the interleaved layout needs AVX-512 VNNI")
def test_prefill_block_gemm_is_the_decode_gemv_row_by_row():
    """O3's ``gemm-a8`` prefill choice for an interleaved layer: the block GEMV over a prefill's rows gives each
    row what decode's GEMV gives it alone (bit for bit), within the autotuner's quality budget of the fp32
    dequantize-then-matmul reference."""
    from openautoglm.compiler.autotune import QUALITY_BUDGET
    from openautoglm.compiler.impls import implementations, reference
    from openautoglm.quant.modules import GEMV_MAX_ROWS, GGMLLinear

    layer = GGMLLinear(random_rows("Q5_0", 64, 512, seed=9), "Q5_0", 512, torch.randn(64))
    make, extra = implementations(layer)["gemm-a8"]
    gemm = make(layer)
    x = torch.randn(2, GEMV_MAX_ROWS + 21, 512, generator=torch.Generator().manual_seed(10))
    y = gemm(x)
    assert y.shape == (2, GEMV_MAX_ROWS + 21, 64) and extra == 0
    assert torch.equal(y, torch.stack([torch.cat([layer(x[b, i:i + 1]) for i in range(x.shape[1])]) for b in range(2)]))
    ref = reference(layer, x)
    assert float((y - ref).norm() / ref.norm()) <= QUALITY_BUDGET


def test_a_ggml_layer_under_batch_invariant_computes_every_row_as_it_does_alone():
    """The server's prompts: under ``batch_invariant`` an interleaved GGML layer runs its int8 kernel at any row
    count, so a prompt chunk's rows are bit for bit the rows one at a time (outside it, more than 16 rows take the
    bf16 GEMM on dequantized weights, whose rounding differs)."""
    from openautoglm import kernels
    from openautoglm.models.layers import batch_invariant
    from openautoglm.quant.modules import GGMLLinear

    if not kernels.interleaves("Q4_K", 32):
        pytest.skip("no interleaved layout on this CPU (no AVX-512 VNNI)")
    lin = GGMLLinear(random_rows("Q4_K", 32, 512, seed=3), "Q4_K", 512, None)
    assert lin.interleaved
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), batch_invariant():
        rows = torch.cat([lin(x[i:i + 1]) for i in range(40)])
        assert torch.equal(lin(x), rows)
