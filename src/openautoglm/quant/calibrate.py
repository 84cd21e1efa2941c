"""Calibration: run a causal LM block by block on calibration windows, and the data-aware pipelines on it.

``BlockRunner`` keeps the hidden states entering the current decoder layer for every calibration window, so
each layer is calibrated on the inputs it really sees (the outputs of the layers before it, already quantized)
and then run to give the next layer's inputs: one layer of activations in memory, two passes per layer.

``calibrated_quantize_`` quantizes a model by a plan with GPTQ or AWQ scaling (+ RTN), layer by layer.
Embedding tables are quantized first with RTN: a lookup has no input Hessian, and with tied embeddings the
one table also feeds the head, so error compensation for one consumer would hurt the other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import causal_mask
from ..progress import Progress
from .api import install, is_tied, layer_weight, planned_layers
from .awq import apply_scales, search_scales
from .config import QuantPlan
from .gptq import gptq, hessian_update
from .modules import from_qparams, quantized_linear


def calibration_windows(tokenizer, text: str | None = None, n_tokens: int = 8192, ctx: int = 512) -> torch.Tensor:
    """(n, ctx) token windows from ``text`` (default: the calibration split of the shipped corpus)."""
    from ..data import calibration_text
    from ..errors import InvalidParameterError

    ids = tokenizer.encode(text if text is not None else calibration_text(), add_special_tokens=False)
    ctx = min(ctx, len(ids))
    n = min(len(ids), n_tokens) // ctx
    if n == 0 or ctx < 16:
        raise InvalidParameterError(f"the calibration text has {len(ids)} tokens; at least 16 are needed")
    return torch.tensor(ids[: n * ctx]).reshape(n, ctx)


class BlockRunner:
    def __init__(self, model: nn.Module, windows: torch.Tensor, batch: int = 4):
        self.model, self.batch = model, batch
        B, T = windows.shape
        pos = torch.arange(T).expand(min(batch, B), T)
        with torch.no_grad():
            self.h = model.model.embed_tokens(windows).float()  # (B, T, D)
        self.cos, self.sin = model.model.rotary_emb(pos)
        self.mask = causal_mask(pos)

    @torch.no_grad()
    def run(self, layer: nn.Module, update: bool) -> None:
        """Run ``layer`` on every window (hooks see its inputs); ``update`` keeps its outputs as the next inputs."""
        out = torch.empty_like(self.h) if update else None
        for i in range(0, self.h.shape[0], self.batch):
            h = self.h[i:i + self.batch]
            b = h.shape[0]
            y = layer(h, self.cos[:b], self.sin[:b], self.mask[:b])
            if update:
                out[i:i + b] = y
        if update:
            self.h = out

    @torch.no_grad()
    def final_inputs(self) -> torch.Tensor:
        """What ``lm_head`` reads: the final norm of the last layer's outputs."""
        return self.model.model.norm(self.h)


class _Inputs:
    """Forward hooks on linears: the Hessian of each one's inputs, or a sample of the input rows."""

    def __init__(self, mods: dict[str, nn.Module], hessian: bool, rows: int = 4096):
        self.H = {n: None for n in mods}
        self.n = {n: 0 for n in mods}
        self.x = {n: [] for n in mods}
        self.hessian, self.rows = hessian, rows
        self._last = (None, None)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in mods.items()]

    def _hook(self, name):
        def hook(mod, inp, out):
            x = inp[0].detach()
            x2 = x.reshape(-1, x.shape[-1])
            self.n[name] += x2.shape[0]
            if self.hessian:
                if self._last[0] is not x:  # q/k/v (and gate/up) read one tensor: one product
                    self._last = (x, hessian_update(None, x2))
                xtx = self._last[1]
                self.H[name] = xtx if self.H[name] is None else self.H[name] + xtx
            elif sum(t.shape[0] for t in self.x[name]) < self.rows:
                self.x[name].append(x2.float().clone())
        return hook

    def hessian_of(self, name):
        return (self.H[name] / max(self.n[name], 1)).float()

    def sample(self, name):
        return torch.cat(self.x[name])[: self.rows]

    def close(self):
        for h in self.handles:
            h.remove()
        self._last = (None, None)


def _awq_groups(layer: nn.Module, prefix: str) -> list[tuple[nn.Module, list[str], slice | None]]:
    """(producer, consumer names, producer rows) for a decoder layer: norm -> q/k/v, norm -> gate/up,
    up -> down, and v -> o where each o input channel has its own v output (no GQA sharing)."""
    attn, mlp = layer.self_attn, layer.mlp
    g = []
    qkv = [n for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if hasattr(attn, n)]
    g.append((layer.input_layernorm, [f"{prefix}.self_attn.{n}" for n in qkv], None))
    if hasattr(attn, "v_proj") and attn.n_kv == attn.n_heads:
        g.append((attn.v_proj, [f"{prefix}.self_attn.o_proj"], None))
    if hasattr(mlp, "gate_up_proj"):
        I = mlp.down_proj.in_features
        g.append((layer.post_attention_layernorm, [f"{prefix}.mlp.gate_up_proj"], None))
        g.append((mlp.gate_up_proj, [f"{prefix}.mlp.down_proj"], slice(I, 2 * I)))
    else:
        g.append((layer.post_attention_layernorm, [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], None))
        g.append((mlp.up_proj, [f"{prefix}.mlp.down_proj"], None))
    return g


def _gptq_layer(model, names, done, hook, act_order):
    """GPTQ treats rows independently under one Hessian, so linears that read the same input with the same
    config (q/k/v, gate/up) are solved as one stacked weight."""
    groups: dict = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        role = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
        key = (f"{parent}.{role.get(leaf, leaf)}", done[n])
        groups.setdefault(key, []).append(n)
    for (_, cfg), ns in groups.items():
        ws = [layer_weight(model, n) for n in ns]
        q, s, z = gptq(torch.cat([w for w, _ in ws]), hook.hessian_of(ns[0]), cfg, act_order=act_order)
        r = 0
        for n, (w, b) in zip(ns, ws):
            k = w.shape[0]
            install(model, n, from_qparams(cfg, q[r:r + k], s[r:r + k], None if z is None else z[r:r + k], b))
            r += k


def calibrated_quantize_(model: nn.Module, plan: QuantPlan, method: str, windows: torch.Tensor,
                         act_order: bool = True, progress: bool = True, stats: dict | None = None) -> dict:
    """Quantize ``model`` in place by ``plan`` with ``method`` in {"gptq", "awq"}. Returns the plan record."""
    done = planned_layers(model, plan)
    tables = [n for n in ("model.embed_tokens",) + (("lm_head",) if is_tied(model) else ()) if n in done]
    for name in tables:  # RTN (see the module docstring)
        w, b = layer_weight(model, name)
        install(model, name, quantized_linear(w, b, done[name]))
    runner = BlockRunner(model, windows)
    layers = list(model.model.layers)
    awq_gain = []
    with Progress(f"{method} calibration", total=len(layers) + 1, unit=" layers", enabled=progress) as pb:
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            names = [n for n in done if n.startswith(prefix + ".")]
            if names:
                mods = {n: model.get_submodule(n) for n in names}
                hook = _Inputs(mods, hessian=(method == "gptq"))
                runner.run(layer, update=False)
                hook.close()
                if method == "awq":
                    for producer, consumers, rows in _awq_groups(layer, prefix):
                        consumers = [c for c in consumers if c in done]
                        if not consumers:
                            continue
                        x = hook.sample(consumers[0])
                        ws = [model.get_submodule(c).weight for c in consumers]
                        s, err, rtn = search_scales(x, ws, [done[c] for c in consumers])
                        awq_gain.append(rtn / max(err, 1e-30))
                        apply_scales(producer, [model.get_submodule(c) for c in consumers], s, rows)
                    for n in names:
                        w, b = layer_weight(model, n)
                        install(model, n, quantized_linear(w, b, done[n]))
                else:
                    _gptq_layer(model, names, done, hook, act_order)
            runner.run(layer, update=True)
            pb.update()
        if "lm_head" in done and "lm_head" not in tables:
            x = runner.final_inputs()
            head = model.lm_head
            if method == "awq":
                xs = x.reshape(-1, x.shape[-1])[:4096]
                s, err, rtn = search_scales(xs, [head.weight], [done["lm_head"]])
                apply_scales(model.model.norm, [head], s)
                install(model, "lm_head", quantized_linear(head.weight, head.bias, done["lm_head"]))
            else:
                H = hessian_update(None, x) / x[..., 0].numel()
                q, s, z = gptq(head.weight, H.float(), done["lm_head"], act_order=act_order)
                install(model, "lm_head", from_qparams(done["lm_head"], q, s, z, head.bias))
        pb.update()
    if stats is not None and awq_gain:
        stats["awq_error_reduction_median"] = float(torch.tensor(awq_gain).median())
    return done
