"""GPTQ and AWQ: against RTN on a layer's output error (the quantity both minimize), GPTQ's bookkeeping against
RTN where no error can be fed back, AWQ scaling against the unscaled float model, and whole-model calibration."""

import pytest
import torch
from torch import nn

from openautoglm.quant.awq import apply_scales, fake_quant, search_scales
from openautoglm.quant.config import Int8WeightOnlyConfig, IntxWeightOnlyConfig
from openautoglm.quant.gptq import gptq, hessian_update
from openautoglm.quant.modules import from_qparams, quantized_linear

CFGS = [IntxWeightOnlyConfig(4, 32), IntxWeightOnlyConfig(3, 64), IntxWeightOnlyConfig(2, 32), Int8WeightOnlyConfig()]


def _acts(n=2048, k=256, seed=0):
    """Correlated activations with a few large channels, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.8 * a)
    x[:, :4] *= 8
    return x


def _out_err(x, w, wq):
    return float((x @ w.t() - x @ wq.t()).pow(2).mean())


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output_error(cfg, act_order):
    x = _acts()
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    H = hessian_update(None, x).float() / x.shape[0]
    q, s, z = gptq(w, H, cfg, act_order=act_order)
    wg = from_qparams(cfg, q, s, z, None).dequantized()
    e_gptq, e_rtn = _out_err(x, w, wg), _out_err(x, w, fake_quant(w, cfg))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_rtn(cfg, act_order):
    # uncorrelated inputs leave no error to feed back: GPTQ must return RTN's codes exactly (permutation, groups
    # and qparams bookkeeping included)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    H = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(3)) + 0.5)
    q, s, z = gptq(w, H, cfg, act_order=act_order)
    ref = quantized_linear(w, None, cfg)
    assert torch.equal(from_qparams(cfg, q, s, z, None).qweight, ref.qweight)


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_real_layer(smollm2_path):
    from openautoglm import Engine
    from openautoglm.quant.calibrate import BlockRunner, _Inputs, calibration_windows

    eng = Engine(model=smollm2_path, progress=False, gguf_weights="float")  # float layers to quantize
    win = calibration_windows(eng.tokenizer, n_tokens=2048, ctx=512)
    run = BlockRunner(eng.model, win)
    for layer in eng.model.model.layers[:3]:
        run.run(layer, update=True)
    down = eng.model.model.layers[3].mlp.down_proj
    hook = _Inputs({"d": down}, hessian=False, rows=100_000)
    run.run(eng.model.model.layers[3], update=False)
    hook.close()
    x = hook.sample("d")
    H = hessian_update(None, x).float() / x.shape[0]
    cfg = IntxWeightOnlyConfig(3, 64)
    q, s, z = gptq(down.weight, H, cfg, act_order=True)
    e_gptq = _out_err(x, down.weight, from_qparams(cfg, q, s, z, None).dequantized())
    e_rtn = _out_err(x, down.weight, fake_quant(down.weight, cfg))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_awq_search_beats_rtn_with_salient_channels():
    x = _acts(seed=4)
    x[:, 10:14] *= 20  # salient input channels
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5)) * 0.02
    cfg = IntxWeightOnlyConfig(3, 64)
    s, err, rtn = search_scales(x, [w], [cfg])
    assert rtn == pytest.approx(_out_err(x, w, fake_quant(w, cfg)), rel=1e-4)  # alpha = 0 is RTN
    assert err < 0.8 * rtn
    assert err == pytest.approx(_out_err(x, w, fake_quant(w * s, cfg) / s), rel=1e-4)


def test_awq_scaling_leaves_the_float_model_unchanged(hf_tiny):
    from openautoglm.loader import load_model
    from openautoglm.quant.calibrate import _awq_groups

    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        g = torch.Generator().manual_seed(1)
        for i, layer in enumerate(model.model.layers):
            for producer, consumers, rows in _awq_groups(layer, f"model.layers.{i}"):
                k = model.get_submodule(consumers[0]).in_features
                apply_scales(producer, [model.get_submodule(c) for c in consumers], torch.rand(k, generator=g) + 0.5, rows)
        after = model(ids)
    assert (after - before).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantization_runs_on_every_architecture(hf_tiny, method, tmp_path):
    from openautoglm.loader import load_model
    from openautoglm.quant import QuantPlan
    from openautoglm.quant.calibrate import calibrated_quantize_

    _, _, d = hf_tiny
    ref, _ = load_model(d, progress=False)
    model, _ = load_model(d, progress=False)
    win = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = IntxWeightOnlyConfig(4, 32)
    done = calibrated_quantize_(model, QuantPlan.uniform(cfg, embeddings="int8"), method, win, progress=False)
    n_lin = sum(isinstance(m, nn.Linear) for m in ref.modules())
    assert len(done) == n_lin + (0 if ref.config.tie_word_embeddings else 1)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lr, lq = torch.log_softmax(ref(ids), -1), torch.log_softmax(model(ids), -1)
    assert float((lr.exp() * (lr - lq)).sum(-1).mean()) < 0.05


@pytest.mark.parametrize("scheme,group", [("int3", 32), ("int4", 64)])
def test_gptq_beats_rtn_on_calibration_kld(tiny_engine_dir, scheme, group):
    from openautoglm import Engine

    kld = {}
    for method in ("rtn", "gptq"):
        eng = Engine(model=tiny_engine_dir, progress=False)
        eng.quantize(scheme, group, method=method, embeddings="float", calib_tokens=2048)
        kld[method] = eng.quant_result.calibration_kld
    assert kld["gptq"] < kld["rtn"], kld
