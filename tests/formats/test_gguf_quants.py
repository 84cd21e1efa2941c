"""Our torch dequantizers against gguf-py's reference, bit for bit, for every supported type."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from openautoglm.formats.gguf_quants import BLOCK_SIZES, dequantize

# byte offsets of the fp16 scale fields inside one block, per type (ggml block structs)
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [-4, -2], "Q3_K": [-2], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [-2],
}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random block bytes whose fp16 scale fields hold finite values of realistic size."""
    rng = np.random.default_rng(seed)
    _, tsize = BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        start = off % tsize
        raw[:, start : start + 2] = vals
    return raw


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
def test_block_types_bit_exact(qtype):
    block, tsize = BLOCK_SIZES[qtype]
    rows, blocks_per_row = 6, 512 // block if block < 256 else 2
    raw = random_blocks(qtype, rows * blocks_per_row).reshape(rows, blocks_per_row * tsize)
    ref = quants.dequantize(raw, GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw), qtype, ref.shape).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantized_real_values_bit_exact(qtype):
    """Blocks produced by gguf-py's own quantizer from Gaussian weights, not just random bytes."""
    w = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32) * 0.05
    raw = quants.quantize(w, GGMLQuantizationType[qtype])
    ref = quants.dequantize(raw, GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw), qtype, ref.shape).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.abs(ours - w).max() < 0.05  # and it is a quantization of w, not noise


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_bit_exact(qtype):
    w = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    gt = GGMLQuantizationType[qtype]
    raw = quants.quantize(w, gt) if qtype == "BF16" else w.astype(np.float16 if qtype == "F16" else np.float32)
    raw_u8 = np.ascontiguousarray(raw).view(np.uint8)
    ref = quants.dequantize(raw, gt).astype(np.float32)
    ours = dequantize(torch.from_numpy(raw_u8.copy()), qtype, ref.shape).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
