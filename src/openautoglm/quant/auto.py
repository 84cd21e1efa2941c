"""Automatic per-layer mixed precision (``--scheme auto --target-bits B``).

1. Sensitivity: lower only one layer (weights fake-quantized with the method's own quantizer: RTN, or GPTQ on
   the layer's calibration Hessian) and measure how much the mean KL divergence from the float model rises on
   calibration text. The hidden states entering each decoder layer are cached, so a probe runs only the layers
   after it. The embedding table and the head are probed at every candidate format. A decoder linear is probed
   at two anchor formats (int2-g64 and int4-g64); its other formats are placed on the line through the anchors
   in log(KLD rise) against log(the layer's own output error on the same text), the second-order picture in
   which the KLD rise grows as a power of the output perturbation. That is 2 probes a linear instead of 5-8,
   ~7 minutes instead of ~20 for SmolLM2 on 2 cores; ``Unit.measured`` says which values were measured.
2. Choice: the per-layer formats minimizing the predicted loss (the sum of the layers' KLD rises) under the
   budget ``sum(n_weights * bits_per_weight) <= B * sum(n_weights)``, bits per weight counting the scales and
   zeros (so the budget is the size on disk). A multiple-choice knapsack, solved exactly by dynamic programming
   on a fine grid of the budget (costs rounded up, so the budget always holds).
3. The plan is a ``QuantPlan`` of exact layer names; the caller quantizes with it and measures the real KLD.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InvalidParameterError
from ..host import atomic_write_text, cache_root
from ..progress import Progress
from .api import is_tied, planned_layers
from .awq import fake_quant
from .calibrate import BlockRunner, _Inputs
from .config import Int8WeightOnlyConfig, QuantPlan, parse_scheme
from .gptq import gptq, hessian_update
from .modules import from_qparams

ANCHORS = ("int2-g64", "int4-g64")
CANDIDATES = ("int2-g128", "int2-g64", "int3-g128", "int3-g64", "int4-g128", "int4-g64", "int4-g32", "int8")


def candidates_for(in_features: int) -> list:
    """The candidate configs a layer of this input width can take (group sizes that divide it), by bits."""
    out = {}
    for name in CANDIDATES:
        cfg = parse_scheme(name)
        if getattr(cfg, "group_size", 0) and in_features % cfg.group_size:
            continue
        out[cfg.name] = cfg
    return sorted(out.values(), key=lambda c: c.bits_per_weight(in_features))


class _Reference:
    """The float model's next-token distributions on the probe text; ``kld(logits)`` is the mean
    KL(reference || candidate) per token (sum p log p is computed once)."""

    def __init__(self, logits: torch.Tensor):
        lp = torch.log_softmax(logits.float(), -1)
        self.p = lp.exp()
        self.neg_entropy = float((self.p * lp).sum(-1).mean())

    def kld(self, logits: torch.Tensor) -> float:
        lq = torch.log_softmax(logits.float(), -1)
        return self.neg_entropy - float((self.p * lq).sum(-1).mean())


@dataclass
class Unit:
    name: str
    n_weights: int
    in_features: int
    dkld: dict  # candidate name -> KLD rise (measured, or placed between the measured anchors)
    measured: list = field(default_factory=list)  # the candidates probed directly

    def cost(self, cfg) -> float:
        return self.n_weights * cfg.bits_per_weight(self.in_features)


def _units(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Quantizable layers -> (weights, input width): every linear, the head (with the tied embedding) and an
    untied embedding."""
    out = {}
    for name in planned_layers(model, QuantPlan.uniform(Int8WeightOnlyConfig())):
        w = model.get_submodule(name).weight
        out[name] = (w.numel(), w.shape[1])
    return out


def _fake(w: torch.Tensor, cfg, H: torch.Tensor | None) -> torch.Tensor:
    if H is None:
        return fake_quant(w, cfg)
    q, s, z = gptq(w, H, cfg, act_order=True)
    return from_qparams(cfg, q, s, z, None).dequantized()


def _place(measured: dict[str, float], err: dict[str, float]) -> dict[str, float]:
    """KLD rises for every format from the two anchors: log d = log d_a + b (log e - log e_a), the slope b from
    the anchors (clamped to [0.5, 2]; 1 is the purely quadratic regime), from the nearer anchor."""
    lo, hi = ANCHORS  # int2 (large error) and int4 (small error)
    floor = 1e-12
    d_lo, d_hi = max(measured[lo], floor), max(measured[hi], floor)
    e_lo, e_hi = max(err[lo], floor), max(err[hi], floor)
    b = math.log(d_lo / d_hi) / math.log(e_lo / e_hi) if e_lo > e_hi * 1.0001 else 1.0
    b = min(max(b, 0.5), 2.0)
    out = {}
    for name, e in err.items():
        if name in measured:
            out[name] = measured[name]
            continue
        e = max(e, floor)
        a_d, a_e = (d_hi, e_hi) if abs(math.log(e / e_hi)) <= abs(math.log(e / e_lo)) else (d_lo, e_lo)
        out[name] = a_d * (e / a_e) ** b
    return out


def cache_key(model_path, method: str, windows: torch.Tensor, calib: torch.Tensor | None) -> str:
    p = Path(model_path)
    st = p.stat() if p.is_file() else (p / "model.safetensors").stat() if (p / "model.safetensors").exists() else None
    h = hashlib.sha256()
    h.update(json.dumps([str(p.resolve()), st.st_size if st else 0, int(st.st_mtime) if st else 0, method,
                         list(CANDIDATES), list(ANCHORS), 3]).encode())
    h.update(windows.numpy().tobytes())
    if calib is not None:
        h.update(calib.numpy().tobytes())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    return cache_root() / "sensitivity"


@torch.no_grad()
def measure_sensitivity(model: nn.Module, windows: torch.Tensor, method: str = "rtn",
                        calib_windows: torch.Tensor | None = None, progress: bool = True,
                        cache_path: Path | None = None) -> dict[str, Unit]:
    """{layer: Unit with the KLD rise of each candidate}. ``method`` "gptq" probes with GPTQ (Hessians from
    ``calib_windows``); anything else with RTN. ``cache_path``: read if present, written after."""
    if cache_path is not None and cache_path.is_file():
        try:
            d = json.loads(cache_path.read_text())
            return {n: Unit(**u) for n, u in d.items()}
        except (ValueError, TypeError):
            pass  # a corrupt cache is measured again
    units = _units(model)
    layers = list(model.model.layers)
    B, T = windows.shape
    pos = torch.arange(T).expand(B, T)
    cos, sin = model.model.rotary_emb(pos)
    from ..models.layers import causal_mask

    mask = causal_mask(pos)
    hs = []
    hooks = [l.register_forward_pre_hook(lambda m, a: hs.append(a[0].detach().clone())) for l in layers]
    ref = _Reference(model(windows))
    for h in hooks:
        h.remove()
    final_in = None

    def tail(i: int, h: torch.Tensor) -> float:
        for layer in layers[i:]:
            h = layer(h, cos, sin, mask)
        return ref.kld(model.lm_head(model.model.norm(h)))

    base = tail(0, hs[0])
    runner = BlockRunner(model, calib_windows) if method == "gptq" else None
    out: dict[str, Unit] = {}
    direct = {"lm_head", "model.embed_tokens"}
    total = sum(len(candidates_for(k)) if n in direct else len(ANCHORS) for n, (_, k) in units.items())
    with Progress("sensitivity", total=total, unit=" probes", enabled=progress) as pb:

        def probe(name: str, start: int | None, H, x=None):
            """Probe ``name`` (a decoder linear when ``x``, its inputs on the probe text, is given)."""
            n, K = units[name]
            lin = model.get_submodule(name)
            w0 = lin.weight.detach().clone()
            res, err, measured = {}, {}, []
            for cfg in candidates_for(K):
                wq = _fake(w0, cfg, H).to(w0.dtype)
                if x is not None:
                    err[cfg.name] = float((x @ (wq - w0).float().t()).pow(2).mean())
                    if cfg.name not in ANCHORS:
                        continue
                lin.weight.copy_(wq)
                if start is None:  # the embedding is read first: the whole model
                    d = ref.kld(model(windows))
                elif start == len(layers):
                    d = ref.kld(model.lm_head(final_in))
                else:
                    d = tail(start, hs[start])
                res[cfg.name] = max(d - base, 0.0)
                measured.append(cfg.name)
                pb.update()
            lin.weight.copy_(w0)
            if x is not None:
                res = _place(res, err)
            out[name] = Unit(name, n, K, res, measured)

        for i, layer in enumerate(layers):
            names = [n for n in units if n.startswith(f"model.layers.{i}.")]
            Hs = None
            if runner is not None:
                hook = _Inputs({n: model.get_submodule(n) for n in names}, hessian=True)
                runner.run(layer, update=True)
                hook.close()
                Hs = {n: hook.hessian_of(n) for n in names}
            xin = _Inputs({n: model.get_submodule(n) for n in names}, hessian=False, rows=10**9)
            layer(hs[i], cos, sin, mask)
            xin.close()
            for n in names:
                probe(n, i, Hs[n] if Hs else None, xin.sample(n).float())
        h = hs[-1]
        final_in = model.model.norm(layers[-1](h, cos, sin, mask))
        if "lm_head" in units:
            tied = is_tied(model)
            H = None
            if runner is not None and not tied:
                x = runner.final_inputs()
                H = (hessian_update(None, x) / x[..., 0].numel()).float()
            probe("lm_head", None if tied else len(layers), H)
        if "model.embed_tokens" in units:
            probe("model.embed_tokens", None, None)
    for u in out.values():  # fewer bits never predict less loss: smooth the probe noise (high to low bits)
        floor = 0.0
        for cfg in reversed(candidates_for(u.in_features)):
            floor = max(floor, u.dkld[cfg.name])
            u.dkld[cfg.name] = floor
    if cache_path is not None:
        atomic_write_text(cache_path, json.dumps({n: u.__dict__ for n, u in out.items()}))
    return out


def solve(units: dict[str, Unit], target_bits: float, resolution: int = 20000) -> tuple[dict, float, float]:
    """Exact multiple-choice knapsack on a grid: ``({layer: config}, predicted KLD, achieved bits/weight)``."""
    names = sorted(units)
    total_w = sum(units[n].n_weights for n in names)
    budget = target_bits * total_w
    cell = budget / resolution
    opts = []
    for n in names:
        u = units[n]
        cands = [c for c in candidates_for(u.in_features) if c.name in u.dkld]
        opts.append([(math.ceil(u.cost(c) / cell - 1e-9), u.dkld[c.name], c) for c in cands])
    need = sum(min(o[0] for o in os_) for os_ in opts)
    if need > resolution:
        least = sum(min(units[n].cost(c) for c in candidates_for(units[n].in_features)) for n in names) / total_w
        if least > target_bits or resolution >= 1 << 20:
            raise InvalidParameterError(f"--target-bits {target_bits} is below the smallest plan "
                                        f"({least:.3f} bits/weight)")
        return solve(units, target_bits, resolution * 4)  # feasible, but the grid's rounding ate the slack
    INF = float("inf")
    dp = np.full(resolution + 1, INF)
    dp[0] = 0.0
    choice = np.zeros((len(names), resolution + 1), dtype=np.int8)
    for ui, os_ in enumerate(opts):
        new = np.full(resolution + 1, INF)
        for ci, (c_cells, loss, _) in enumerate(os_):
            if c_cells > resolution:
                continue
            cand = np.full(resolution + 1, INF)
            cand[c_cells:] = dp[: resolution + 1 - c_cells] + loss
            better = cand < new
            new[better] = cand[better]
            choice[ui][better] = ci
        dp = new
    b = int(np.argmin(dp))
    pred = float(dp[b])
    plan = {}
    for ui in range(len(names) - 1, -1, -1):
        ci = int(choice[ui][b])
        c_cells, _, cfg = opts[ui][ci]
        plan[names[ui]] = cfg
        b -= c_cells
    bits = sum(units[n].cost(c) for n, c in plan.items()) / total_w
    return plan, pred, bits


def plan_table(plan: dict, units: dict[str, Unit]) -> str:
    lines = [f"{'layer':<42} {'format':<10} {'bits/w':>7} {'pred dKLD':>10}"]
    for n in sorted(plan, key=_layer_order):
        c, u = plan[n], units[n]
        lines.append(f"{n:<42} {c.name:<10} {c.bits_per_weight(u.in_features):>7.3f} {u.dkld[c.name]:>10.2e}")
    return "\n".join(lines)


def _layer_order(name: str):
    parts = name.split(".")
    return (int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else (-1 if "embed" in name else 10**6), name)

