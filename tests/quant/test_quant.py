"""Quantization primitives and modules: SQNR floors, pack/unpack identity, fast kernel == dequantized reference,
quantize_ on whole models (greedy tokens and KLD against the float model)."""

import pytest
import torch
from torch import nn

from openautoglm.quant import Int4WeightOnlyConfig, Int8WeightOnlyConfig, QuantPlan, quantize_
from openautoglm.quant import primitives as P
from openautoglm.quant.modules import Int4Linear, Int8Linear

# Floors for Gaussian weights (theory: int8 per channel ~ 40 dB, int4 per group of 32 ~ 20 dB at these sizes);
# a broken rounding, scale or group layout drops far below them.
FLOORS = {("int8", None): 38.0, ("int4", 32): 19.0, ("int4", 64): 18.0, ("int4", 128): 17.0}


def _w(n=256, k=512, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("scheme,group", list(FLOORS))
def test_sqnr_floor_random(scheme, group):
    w = _w()
    if scheme == "int8":
        q, s = P.int8_per_channel(w)
        wh = P.dequant_int8(q, s)
    else:
        q, s, z = P.asym_per_group(w, 4, group)
        wh = P.dequant_asym(q, s, z, 4)
    assert P.sqnr_db(w, wh) > FLOORS[(scheme, group)]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,group", list(FLOORS))
def test_sqnr_floor_real_layers(smollm2_path, scheme, group):
    from openautoglm.formats import open_checkpoint

    ck = open_checkpoint(smollm2_path)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.15.mlp.down_proj.weight"):
        w = ck.load(name)
        if scheme == "int8":
            wh = P.dequant_int8(*P.int8_per_channel(w))
        else:
            g = group if w.shape[1] % group == 0 else 64  # K=576: g128 falls back to g64 (see fit_group)
            wh = P.dequant_asym(*P.asym_per_group(w, 4, g), 4)
        # real layers are already on a Q4_1 grid (group 32) and have outliers: a lower floor than Gaussian
        assert P.sqnr_db(w, wh) > FLOORS[(scheme, group)] - 4, name


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_identity(bits):
    q = torch.randint(0, 1 << bits, (7, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    p = P.pack_bits(q, bits)
    assert p.shape == (7, 64 * bits // 8)
    assert torch.equal(P.unpack_bits(p, bits, 64), q)


def test_int4_codes_round_trip_through_module():
    lin = nn.Linear(256, 64, bias=True)
    m = Int4Linear.from_linear(lin, Int4WeightOnlyConfig(32))
    q, s, z = P.asym_per_group(lin.weight.detach(), 4, 32)
    assert torch.equal(m.codes(), q)


@pytest.mark.parametrize("cls,cfg", [(Int8Linear, Int8WeightOnlyConfig()), (Int4Linear, Int4WeightOnlyConfig(32)),
                                     (Int4Linear, Int4WeightOnlyConfig(128))])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_fast_kernel_matches_dequantized_reference(cls, cfg, m):
    torch.manual_seed(0)
    lin = nn.Linear(512, 384, bias=True)
    mod = cls.from_linear(lin, cfg)
    x = torch.randn(m, 512)
    ref = mod.forward_reference(x)
    got = mod(x)
    # bf16 activations in the kernel: relative error of the output ~ 2^-8
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-2, float(err)


def test_group_falls_back_to_a_divisor_of_k():
    from openautoglm.quant.api import fit_group

    assert fit_group(Int4WeightOnlyConfig(128), 576).group_size == 64
    assert fit_group(Int4WeightOnlyConfig(128), 1536).group_size == 128
    model = nn.Sequential(nn.Linear(576, 32))
    model.config = None
    done = quantize_(model, QuantPlan((("*", Int4WeightOnlyConfig(128)),)))
    assert done["0"].group_size == 64 and model[0].group_size == 64


def test_plan_patterns_pick_per_layer_configs(hf_tiny):
    from openautoglm.loader import load_model

    _, _, d = hf_tiny
    model, _ = load_model(d, progress=False)
    plan = QuantPlan((("lm_head", None), ("*.mlp.*", Int4WeightOnlyConfig(32)), ("*", Int8WeightOnlyConfig())))
    done = quantize_(model, plan)
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in done if ".mlp." in n)
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in done if ".self_attn." in n)
    assert "lm_head" not in done and isinstance(model.lm_head, nn.Linear)


@pytest.mark.parametrize("cfg", [Int8WeightOnlyConfig(), Int4WeightOnlyConfig(32)])
def test_quantized_model_tracks_float_model(tiny_engine_dir, cfg):
    from openautoglm.loader import load_model

    ref, _ = load_model(tiny_engine_dir, progress=False)
    qm, _ = load_model(tiny_engine_dir, progress=False)
    quantize_(qm, cfg)
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        lr, lq = torch.log_softmax(ref(ids), -1), torch.log_softmax(qm(ids), -1)
    kld = (lr.exp() * (lr - lq)).sum(-1).mean()
    assert kld < (0.01 if cfg.scheme == "int8" else 0.1), float(kld)
