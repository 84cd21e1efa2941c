"""Every architecture against HF transformers on tiny random checkpoints: full-forward logits in fp32."""

import torch

from openautoglm.loader import load_model


def test_logits_match_transformers(hf_tiny):
    arch, hf, d = hf_tiny
    ours, _ = load_model(d, progress=False)
    ids = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
