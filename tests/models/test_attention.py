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


def _ops():
    from openautoglm import kernels

    if not kernels.load_ops():
        pytest.skip("no native operators on this machine")
    return torch.ops.openautoglm.decode_attention


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_batch_invariant_attention_computes_each_query_as_the_decode_operator_alone(kv_dtype):
    """Under ``batch_invariant`` a prompt's queries (any chunking, in a padded batch) are each bit for bit the decode
    operator on that query alone, with its own keys and attended length: what a server needs for concurrent ==
    alone. The oracle is the operator itself, one query a call, over exactly the slots it may attend."""
    from openautoglm.models.layers import batch_invariant

    op = _ops()
    g = torch.Generator().manual_seed(1)
    B, H, KV, S, D = 2, 6, 2, 300, 64
    k, v = (torch.randn(B, KV, S, D, generator=g).to(kv_dtype) for _ in range(2))
    pos = torch.tensor([[200 + t for t in range(37)], [40 + t for t in range(37)]])  # two rows' chunks
    q = torch.randn(B, H, 37, D, generator=g)
    mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]
    with batch_invariant():
        got = attention(q, k, v, mask)
    for b in range(B):
        for t in (0, 5, 36):
            n = int(pos[b, t]) + 1
            alone = op(q[b:b + 1, :, t:t + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                       torch.ones(1, 1, 1, n, dtype=torch.bool), None)
            assert torch.equal(got[b, t], alone.reshape(H * D)), (b, t)
    # and outside the context nothing changes: SDPA, within float rounding of the same numbers
    torch.testing.assert_close(attention(q, k.float(), v.float(), mask), got, atol=1e-5, rtol=1e-4)


def test_the_decode_operator_does_not_depend_on_the_attended_length_or_the_batch():
    """A row's chunks of slots are a function of its own extent: the same query over a longer attended length (the
    masked slots past its extent) or beside other rows gives the same bits (a server's bucketed, batched steps)."""
    op = _ops()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 9, 1, 64, generator=g)
    k, v = (torch.randn(3, 3, 1024, 64, generator=g).half() for _ in range(2))
    ext = torch.tensor([300, 1000, 70])
    outs = []
    for S in (1024, 1000):
        m = torch.arange(S)[None, None, None, :] < ext[:, None, None, None]
        outs.append(op(q, k[:, :, :S], v[:, :, :S], m, None))
    alone = [op(q[i:i + 1], k[i:i + 1, :, :int(ext[i])], v[i:i + 1, :, :int(ext[i])],
                torch.ones(1, 1, 1, int(ext[i]), dtype=torch.bool), None) for i in range(3)]
    for o in outs:
        assert torch.equal(o, torch.cat(alone))


def test_batch_invariant_attention_over_the_int8_cache_is_the_q8_operator_alone():
    """The int8 cache's (codes, scales, key smoothing): each prompt query under ``batch_invariant`` is bit for bit
    the q8 decode operator on that query alone, with the smoothing applied to the query as O3's decode step does."""
    from openautoglm.models.layers import batch_invariant, quantize_kv

    _ops()
    op = torch.ops.openautoglm.decode_attention_q8
    g = torch.Generator().manual_seed(3)
    B, H, KV, S, D, T = 2, 6, 2, 200, 64, 21
    (kq, ks), (vq, vs) = (quantize_kv(torch.randn(B, KV, S, D, generator=g)) for _ in range(2))
    sm = torch.rand(KV, D, generator=g) + 0.5
    pos = torch.tensor([[150 + t for t in range(T)], [30 + t for t in range(T)]])
    q = torch.randn(B, H, T, D, generator=g)
    mask = torch.arange(S)[None, None, None, :] <= pos[:, None, :, None]
    with batch_invariant():
        got = attention(q, (kq, ks, sm), (vq, vs), mask)
    qs = q * sm.repeat_interleave(H // KV, 0)[None, :, None, :]
    for b in range(B):
        for t in (0, 11, T - 1):
            n = int(pos[b, t]) + 1
            alone = op(qs[b:b + 1, :, t:t + 1], kq[b:b + 1, :, :n], ks[b:b + 1, :, :n], vq[b:b + 1, :, :n],
                       vs[b:b + 1, :, :n], torch.ones(1, 1, 1, n, dtype=torch.bool), None)
            assert torch.equal(got[b, t], alone.reshape(H * D)), (b, t)
    # outside the context: the dequantized SDPA path, the same attention within rounding
    torch.testing.assert_close(attention(q, (kq, ks, sm), (vq, vs), mask), got, atol=2e-3, rtol=2e-3)
