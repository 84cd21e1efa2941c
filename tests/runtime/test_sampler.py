"""Sampling processors against transformers' logits processors, and parameter validation."""

import pytest
import torch

from openautoglm.errors import InvalidParameterError
from openautoglm.runtime.sampler import SamplingParams, apply_repetition_penalty, filter_logits, make_generator, sample


def _logits(seed=0, v=500):
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    l = _logits()
    seen = torch.tensor([3, 7, 7, 100, 499])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], l[None].clone())[0]
    got = apply_repetition_penalty(l.clone(), torch.unique(seen), 1.3)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("kw,proc", [
    (dict(top_k=17), lambda: __import__("transformers").TopKLogitsWarper(17)),
    (dict(top_p=0.8), lambda: __import__("transformers").TopPLogitsWarper(0.8)),
    (dict(min_p=0.05), lambda: __import__("transformers").MinPLogitsWarper(0.05)),
])
def test_filters_keep_the_same_tokens_as_transformers(kw, proc):
    for seed in range(5):
        l = _logits(seed)
        got = filter_logits(l, SamplingParams(temperature=1.0, **kw))
        ref = proc()(None, l[None].clone())[0]
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), seed


def test_temperature_scales_logits():
    l = _logits()
    torch.testing.assert_close(filter_logits(l, SamplingParams(temperature=0.5)).softmax(-1), (l / 0.5).softmax(-1))


def test_tiny_temperature_is_the_argmax_not_nan():
    """l / 1e-300 overflows to inf, and softmax of inf is NaN (multinomial then raises); the limit is argmax."""
    l = _logits()
    probs = filter_logits(l, SamplingParams(temperature=1e-300)).softmax(-1)
    assert torch.equal(probs, torch.nn.functional.one_hot(l.argmax(), l.numel()).float())
    g = make_generator(0)
    assert int(sample(l[None], [SamplingParams(temperature=1e-300, seed=0)], [g])[0]) == int(l.argmax())


def test_seeded_draws_are_reproducible_and_seed_dependent():
    l = torch.stack([_logits(i) for i in range(4)]) / 3
    p = [SamplingParams(temperature=1.0, seed=42)] * 4
    a = [sample(l, p, [make_generator(42) for _ in range(4)]) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = {tuple(sample(l, p, [make_generator(s) for _ in range(4)]).tolist()) for s in range(20)}
    assert len(draws) > 1


def test_greedy_and_degenerate_filters_are_argmax():
    l = torch.stack([_logits(i) for i in range(3)])
    gens = [make_generator(0) for _ in range(3)]
    want = l.argmax(-1)
    for kw in (dict(), dict(temperature=1.0, top_k=1), dict(temperature=1.0, min_p=1.0), dict(temperature=0.0, top_p=0.5)):
        assert torch.equal(sample(l, [SamplingParams(**kw)] * 3, gens), want), kw


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
    dict(top_k=2.5), dict(min_p=1.5), dict(repetition_penalty=0.0), dict(max_tokens=0), dict(max_tokens=-3),
    dict(seed="x"), dict(stop=[""]), dict(temperature="hot"),
])
def test_invalid_values_raise_typed_error(kw):
    with pytest.raises(InvalidParameterError):
        SamplingParams(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_ids_are_torch_argmax_ties_and_nan_included(dtype):
    from openautoglm.runtime.sampler import greedy_ids

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 49152, generator=g).to(dtype)
    x[1, 7] = x[1, 900] = x[1].max() + 1  # a tie: the first index
    x[2, 5000] = float("nan")  # NaN counts as the largest
    x[3] = 0.0  # all equal
    out = greedy_ids(x[:, ::1])
    assert out.dtype == torch.long and torch.equal(out, x.argmax(-1))
    assert torch.equal(greedy_ids(x.t().contiguous().t()), x.argmax(-1))  # non-contiguous rows


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_extreme_repetition_penalty_samples_a_seen_or_best_token(penalty):
    """A penalty of 1e-300 sends seen positive logits to +inf (softmax NaN): sampling returns the penalized
    row's argmax (the limit) instead of raising. 1e300 sends seen negative ones to -inf: never drawn."""
    l = _logits()
    seen = [int(i) for i in torch.topk(l, 5).indices] + [int(l.argmin())]
    got = sample(l[None], [SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0)], [make_generator(0)],
                 [seen])
    ref = apply_repetition_penalty(l.clone(), torch.tensor(sorted(set(seen))), penalty)
    if penalty < 1:
        assert int(got[0]) == int(ref.argmax())
    else:
        assert ref[int(got[0])] > float("-inf") and int(got[0]) != int(l.argmin())
