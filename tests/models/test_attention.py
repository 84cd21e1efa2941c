"""The causal attention of a step from position 0 (``mask=None``: SDPA's is_causal, in chunks of queries past
``CAUSAL_CHUNK``) against SDPA with the explicit causal mask."""

import pytest
import torch
import torch.nn.functional as F

from openautoglm.models.layers import CAUSAL_CHUNK, attention


@pytest.mark.parametrize("T", [1, 7, CAUSAL_CHUNK, CAUSAL_CHUNK + 1, 2 * CAUSAL_CHUNK + 45])
@pytest.mark.parametrize("kv_heads", [2, 6])  # grouped-query and plain multi-head
def test_unmasked_causal_attention_matches_the_masked_one(T, kv_heads):
    g = torch.Generator().manual_seed(T * 10 + kv_heads)
    q = torch.randn(2, 6, T, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, T, 16, generator=g) for _ in range(2))
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != 6)
    ref = ref.transpose(1, 2).reshape(2, T, 6 * 16)
    torch.testing.assert_close(attention(q, k, v, None), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, mask[None, None].expand(2, 1, T, T)), ref, atol=1e-5, rtol=1e-5)


def test_eager_decode_attention_is_batch_invariant():
    """One query position a row over a masked cache: each row of a batch is bit for bit the row alone (torch's SDPA
    alone blocks a batch differently; int8 activations downstream would turn that into different tokens)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 1, 32, generator=g)
    k, v = (torch.randn(5, 2, 40, 32, generator=g) for _ in range(2))
    mask = torch.arange(40)[None, None, None, :] < torch.tensor([3, 40, 17, 25, 1])[:, None, None, None]
    out = attention(q, k, v, mask)
    assert out.shape == (5, 1, 6 * 32)
    for i in range(5):
        assert torch.equal(out[i:i + 1], attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1]))
