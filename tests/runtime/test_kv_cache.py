"""Cached decode against the uncached full forward, per architecture, and rows at different positions; the same for
the int8 cache, against one forward over a fresh int8 cache (a prompt's own keys are attended quantized too)."""

import pytest
import torch

from openautoglm.loader import load_model
from openautoglm.runtime.kv_cache import KVCache


@pytest.mark.parametrize("steps", [
    [(0, 10)] + [(t, t + 1) for t in range(10, 24)],  # a prefill, then one token a step
    [(0, 9), (9, 17), (17, 24)],  # a prompt in chunks: the first (from position 0) attends to its own keys
    # causally, without a mask; the later ones attend to the cache through the mask
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_cached_steps_match_full_forward(hf_tiny, steps, dtype):
    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        full = model(ids) if dtype == torch.float32 else model(ids, pos, KVCache.for_model(model, 2, 32, dtype))
        cache = KVCache.for_model(model, batch=2, max_len=32, dtype=dtype)
        out = [model(ids[:, a:b], pos[:, a:b], cache) for a, b in steps]
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_rows_at_different_positions_match_single_runs(hf_tiny, dtype):
    """Right-padded batched prefill, then each row decodes at its own position."""
    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, 320, (n,), generator=g) for n in (5, 12, 9)]
    cont = torch.randint(0, 320, (3, 6), generator=g)

    def single(x):
        if dtype == torch.float32:
            return model(x)
        return model(x, torch.arange(x.shape[1])[None], KVCache.for_model(model, 1, x.shape[1], dtype))

    with torch.no_grad():
        singles = [single(torch.cat([s, cont[i]])[None])[0, len(s) :] for i, s in enumerate(seqs)]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        cache = KVCache.for_model(model, batch=3, max_len=T + 8, dtype=dtype)
        model(ids, torch.arange(T).expand(3, T), cache)
        lens = torch.tensor([len(s) for s in seqs])
        outs = []
        for t in range(6):
            outs.append(model(cont[:, t : t + 1], (lens + t)[:, None], cache)[:, 0])
        batched = torch.stack(outs, dim=1)
    for i in range(3):
        torch.testing.assert_close(batched[i], singles[i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("chosen", [[2, 0], [1, 2]])  # gathered rows, and a contiguous run (read as a view)
def test_slots_map_rows_to_cache_rows(hf_tiny, chosen, dtype):
    """A step over a subset of cache rows (slots) equals the step over the full batch."""
    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    ids = torch.randint(0, 320, (3, 8), generator=torch.Generator().manual_seed(7))
    nxt = torch.randint(0, 320, (3, 1), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        cache = KVCache.for_model(model, batch=3, max_len=16, dtype=dtype)
        model(ids, torch.arange(8).expand(3, 8), cache)
        ref = model(nxt, torch.full((3, 1), 8), cache)[:, 0]
        cache2 = KVCache.for_model(model, batch=3, max_len=16, dtype=dtype)
        model(ids, torch.arange(8).expand(3, 8), cache2)
        slots = torch.tensor(chosen)
        cache2.select(slots)
        sub = model(nxt[slots], torch.full((2, 1), 8), cache2)[:, 0]
    torch.testing.assert_close(sub, ref[slots], atol=1e-5, rtol=0)


def test_int8_cache_rows_move_with_their_scales(hf_tiny):
    """move_row / swap_rows carry the scales with the codes: a decode on a moved row is the one on its source,
    and the int8 cache holds ~half of bf16's bytes (66 of 128 a 64-wide head; 34 of 64 for this 32-wide one)."""
    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(9))
    nxt = torch.tensor([[7]])
    with torch.no_grad():
        cache = KVCache.for_model(model, batch=3, max_len=16, dtype=torch.int8)
        model(ids, torch.arange(10)[None], cache)  # row 0
        ref = model(nxt, torch.tensor([[10]]), cache)
        cache.move_row(0, 2, 11)
        cache.swap_rows(2, 1, 11)  # row 0's keys are now in row 1
        cache.select(torch.tensor([1]))
        moved = model(nxt, torch.tensor([[10]]), cache)
    assert torch.equal(moved, ref)
    hd = model.config.head_dim
    bf16 = KVCache.for_model(model, 3, 16, torch.bfloat16).nbytes
    assert cache.nbytes == bf16 * (hd + 2) // (2 * hd)


def test_int8_key_smoothing_is_exact_math_and_shrinks_the_error_on_outlier_channels(hf_tiny):
    """Calibrated smoothing divides keys by a per-channel-pair factor and multiplies the queries by it: the int8
    cache's chunked steps still equal one forward over a fresh (equally calibrated) cache, and with a key channel
    pair made an outlier (its k_proj rows scaled 30x in every layer) the keys the int8 cache gives back (codes x
    scales x smoothing) are closer to the fp32 cache's on the other channels, by more than half."""
    from openautoglm.runtime.kv_cache import dequantize_kv

    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    from openautoglm.runtime.kv_cache import rope_partners

    D = model.config.head_dim
    pair = [1, int(rope_partners(model, D)[1])]  # (1, 1 + rd/2), or (1, 0) interleaved
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[pair] *= 30  # kv head 0's channel pair
    g = torch.Generator().manual_seed(11)
    calib, ids = torch.randint(0, 320, (40,), generator=g).tolist(), torch.randint(0, 320, (1, 24), generator=g)
    pos = torch.arange(24)[None]

    def run(dtype, smooth, chunks=((0, 24),)):
        c = KVCache.for_model(model, 1, 32, dtype)
        if smooth:
            c.calibrate_keys(model, calib)
            sm = c.k_smooth[0][0]
            assert sm[pair[0]] == sm[pair[1]] > 10 * sm[[i for i in range(D) if i not in pair]].max()
        with torch.no_grad():
            out = torch.cat([model(ids[:, a:b], pos[:, a:b], c) for a, b in chunks], dim=1)
        return out, c

    smoothed, c = run(torch.int8, True)
    torch.testing.assert_close(run(torch.int8, True, ((0, 9), (9, 17), (17, 24)))[0], smoothed, atol=1e-4, rtol=0)
    _, ref = run(torch.float32, False)
    _, plain = run(torch.int8, False)
    others = [i for i in range(D) if i not in pair]

    def key_err(cache):
        errs = []
        for layer in range(len(cache.k)):
            k = dequantize_kv(cache.k[layer][:, :, :24], cache.k_scale[layer][:, :, :24], torch.float32)
            k = k * cache.k_smooth[layer][None, :, None, :]
            errs.append((k - ref.k[layer][:, :, :24])[0, 0][:, others].abs().mean())
        return float(torch.stack(errs).mean())

    assert key_err(c) < 0.5 * key_err(plain), (key_err(c), key_err(plain))
