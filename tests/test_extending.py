"""Extending megatron_mole: a new router and a new adapter kind, each one class plus its
registration, defined here and nowhere in the library (README "Extending").

* ``ThresholdRouter`` ("test_threshold"): a router with TWO parameters (a gate matrix
  and a per-expert log-temperature) that sends each token to a *variable* number of
  experts: its top-k candidates, keeping slot j > 0 when p_j >= ratio * p_0. Checked
  against a per-token loop (outputs and every gradient, both expert scopes), trained at
  EP1, EP2 (all-to-all) and TP2 with the same losses, exported and reloaded into
  transformers with the same logits, and counted by the memory estimate.
* ``BiasDelta`` ("test_bias", with method "test_bias"): y = W x + d, a trainable
  output-bias delta per adapted linear (split like the output under TP). Exported (its
  rows follow the converter's qkv / gate-up ops), reloaded into transformers with the
  same logits, and counted by the memory estimate.
"""
import json

import pytest
import torch
from torch import nn

from megatron_mole.layers import register_adapter_kind, register_method
from megatron_mole.layers.linear import LinearAdapter
from megatron_mole.layers.specs import AdapterKind, Method, TensorSpec
from megatron_mole.routing import Router, RouterTensor, Routing, register_router
from megatron_mole.routing.topk import add_standard_aux_losses
from tests._dist import run_distributed


# ---------------------------------------------------------------- the toy router
@register_router("test_threshold")
class ThresholdRouter(Router):
    @classmethod
    def tensor_specs(cls, in_features, cfg):
        return [RouterTensor("weight", (cfg.num_experts, in_features), in_dim=1),
                RouterTensor("log_temperature", (cfg.num_experts,), in_dim=None, init="zeros")]

    @classmethod
    def check_args(cls, router_args, cfg):
        unknown = set(router_args) - {"ratio"}
        if unknown:
            raise ValueError(f"MoLEConfig.router_args: unknown key(s) {sorted(unknown)}")

    def forward(self, x_TD, ctx=None, reduce_logits=None):
        logits_TE = self.logits(x_TD, reduce_logits) * self.log_temperature.float().exp()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        valid_TK = gates_TK >= self.cfg.router_args.get("ratio", 0.5) * gates_TK[:, :1]
        routing = Routing(idx_TK, gates_TK, probs_TE, logits_TE, valid_TK=valid_TK,
                          mask_T=None if ctx is None else ctx.mask_T)
        add_standard_aux_losses(routing, self.cfg, self, ctx)
        routing.stats["experts_per_token"] = valid_TK.float().sum(-1).mean().detach()
        return routing


def _reference_routing(W, log_t, x, k, ratio):
    """Per token, plain Python: (experts, gates) of ThresholdRouter (in fp32, as routers compute)."""
    p = torch.softmax((W @ x.float()) * log_t.exp(), -1).to(x.dtype)
    q = p.detach().tolist()
    order = sorted(range(len(q)), key=lambda e: -q[e])[:k]
    return [e for j, e in enumerate(order) if j == 0 or q[e] >= ratio * q[order[0]]], p


# ---------------------------------------------------------------- the toy adapter kind
class BiasDelta(LinearAdapter):
    """y = W x + d (d [O, 1]): no routing, one tensor."""

    kind = "test_bias"

    def __init__(self, base, cfg, placement=None):
        super().__init__(base, cfg, placement)
        self.delta_bias = nn.Parameter(torch.zeros(self.out_local, 1, dtype=self.dtype, device=self.device))

    param_rewrites = {"bias_delta.": "delta_"}

    def forward(self, x, *args, **kwargs):
        res = self.base(x, *args, **kwargs)
        out, bias = res if isinstance(res, tuple) else (res, None)
        out = out + self.delta_bias[:, 0].to(out.dtype)
        return (out, bias) if isinstance(res, tuple) else out


@register_adapter_kind
class BiasDeltaKind(AdapterKind):
    name, unit, wrapper = "test_bias", "linear", BiasDelta

    def tensors(self, cfg, dims):
        d_in, d_out = dims.of(None)
        return [TensorSpec("bias_delta.bias", (d_out, 1), out_dim=0, init="kaiming", fan_in=d_in)]


@register_method
class BiasDeltaMethod(Method):
    name = "test_bias"

    def kind_for(self, cfg, linear, in_dense_mlp):
        return "test_bias"


# ---------------------------------------------------------------- per-token loop
@pytest.fixture
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _cfg(scope, **kw):
    from megatron_mole.config import MoLEConfig

    return MoLEConfig(num_experts=4, top_k=3, rank=3, alpha=6, expert_scope=scope, router="test_threshold",
                      router_args={"ratio": 0.6}, lora_b_init="random", aux_loss_coeff=0.0, **kw)


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_variable_router_linear_scope_equals_per_token_loop(_float64):
    from megatron_mole.layers.linear import MoLELinear

    cfg = _cfg("linear")
    layer = MoLELinear(nn.Linear(5, 4), cfg)
    _randomize(layer, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 5, generator=gen).requires_grad_()
    dy = torch.randn(12, 1, 4, generator=gen)
    (layer(x) * dy).sum().backward()

    leaves = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    W, b = leaves["base.weight"], leaves["base.bias"]
    A, B = leaves["mole.lora_a"], leaves["mole.lora_b"]
    x2 = x.detach().clone().requires_grad_()
    outs, used = [], []
    for t in range(12):
        experts, p = _reference_routing(leaves["router.weight"], leaves["router.log_temperature"], x2[t, 0], 3, 0.6)
        used.append(len(experts))
        y = W @ x2[t, 0] + b
        for e in experts:
            y = y + p[e] * cfg.scaling * (B[e] @ (A[e] @ x2[t, 0]))
        outs.append(y)
    assert len(set(used)) > 1, used  # the number of experts really varies
    (torch.stack(outs)[:, None] * dy).sum().backward()
    # the router computes in fp32 (its share of x's gradient too): fp32 tolerances
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-4, atol=1e-5, msg=name)


class _MLP(nn.Module):
    def __init__(self, hidden, ffn):
        from types import SimpleNamespace

        super().__init__()
        self.config = SimpleNamespace(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
        self.linear_fc1 = nn.Linear(hidden, 2 * ffn)
        self.linear_fc2 = nn.Linear(ffn, hidden)

    def act(self, z):
        g, u = z.chunk(2, -1)
        return torch.nn.functional.silu(g) * u


@pytest.mark.parametrize("ep_like", [False, True])
def test_variable_router_mlp_scope_equals_per_token_loop(_float64, ep_like):
    """Local fused path and the expert-side path (what EP runs, here on one rank)."""
    from megatron_mole.layers.mole_mlp import MoLEMLP

    cfg = _cfg("mlp")
    layer = MoLEMLP(_MLP(6, 5), cfg)
    _randomize(layer, 2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(14, 1, 6, generator=gen).requires_grad_()
    dy = torch.randn(14, 1, 6, generator=gen)
    if ep_like:
        layer.mixture = lambda x_TH, routing, shared=False: layer.expert_side_mixture(x_TH, routing)
    (layer(x)[0] * dy).sum().backward()

    leaves = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    W1, b1, W2, b2 = (leaves[f"base.linear_fc{i}.{w}"] for i, w in ((1, "weight"), (1, "bias"), (2, "weight"),
                                                                  (2, "bias")))
    A1, B1, A2, B2 = (leaves[f"fc{i}.lora_{ab}"] for i, ab in ((1, "a"), (1, "b"), (2, "a"), (2, "b")))
    x2 = x.detach().clone().requires_grad_()
    s, outs, used = cfg.scaling, [], []
    for t in range(14):
        xt = x2[t, 0]
        experts, p = _reference_routing(leaves["router.weight"], leaves["router.log_temperature"], xt, 3, 0.6)
        used.append(len(experts))
        total = sum(p[e] for e in experts)
        hbar, y_ad = 0, 0
        for e in experts:
            h = layer.base.act(W1 @ xt + b1 + p[e] * s * (B1[e] @ (A1[e] @ xt)))
            hbar = hbar + p[e] / total * h
            y_ad = y_ad + p[e] * s * (B2[e] @ (A2[e] @ h))
        outs.append(W2 @ hbar + b2 + y_ad)
    assert len(set(used)) > 1, used
    (torch.stack(outs)[:, None] * dy).sum().backward()
    # the router computes in fp32 (its share of x's gradient too): fp32 tolerances
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------- parallel parity
LAYOUTS = [dict(tp=1, ep=1, sp=False), dict(tp=1, ep=2, sp=False), dict(tp=2, ep=1, sp=True)]


def _parity(_):
    import megatron_mole as mm
    from megatron_mole.routing import set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    batches = _models.make_batches(1, global_batch=2).repeat(3, 1, 1)  # one batch: the loss must fall
    out = {}
    for scope in ("mlp", "linear"):
        for layout in LAYOUTS:
            set_model_parallel(tp=layout["tp"], ep=layout["ep"])
            model, config = _models.build_gpt(sequence_parallel=layout["sp"])
            _models.seed_full_params(model, seed=3)
            cfg = mm.MoLEConfig(num_experts=4, rank=4, alpha=8, seed=5, top_k=3, expert_scope=scope,
                                router="test_threshold", router_args={"ratio": 0.3}, lora_b_init="random",
                                aux_loss_coeff=0.01, dispatch="alltoall",
                                targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
            mm.apply_mole(model, cfg)
            dp = 2 // layout["tp"]
            set_aux_loss_scale(dp / 2)
            out[(scope, str(layout))] = _models.train(model, config, batches, lr=0.5)
    set_aux_loss_scale(None)
    # the routing context: scope "linear" routers see the model's padding mask and their layer
    set_model_parallel(tp=1, ep=1)
    model, _ = _models.build_gpt()
    mm.apply_mole(model, mm.MoLEConfig(num_experts=4, expert_scope="linear", router="test_threshold",
                                       targets=["linear_qkv", "linear_fc2"]))
    seen = []
    for module in model.modules():
        if isinstance(module, ThresholdRouter):
            module.register_forward_hook(lambda m, args, routing: seen.append(
                (args[1].layer, int(args[1].mask_T.sum()), routing.mask_T.shape[0])))
    tokens = batches[0][:1, :-1]
    padding = torch.zeros_like(tokens, dtype=torch.bool)
    padding[:, -5:] = True
    model(tokens, torch.arange(tokens.shape[1])[None], None, padding_mask=padding)
    out["seen"] = sorted(seen)
    return out


def test_variable_router_trains_alike_at_ep1_ep2_tp2():
    res = run_distributed(_parity, 2, None, timeout=600)[0]
    for scope in ("mlp", "linear"):
        ref = res[(scope, str(LAYOUTS[0]))]
        assert ref[-1] < ref[0], (scope, ref)
        for layout in LAYOUTS[1:]:
            got = res[(scope, str(layout))]
            assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (scope, layout, ref, got)
    seq = res["seen"][0][2]
    assert res["seen"] == sorted([(layer, seq - 5, seq) for layer in (0, 1) for _ in range(2)]), res["seen"]


# ---------------------------------------------------------------- export, transformers, memory
EXPORTS = {
    "router_mlp": dict(expert_scope="mlp", router="test_threshold", router_args={"ratio": 0.3}, top_k=3,
                       targets=["linear_qkv", "linear_fc1", "linear_fc2"]),
    "router_linear": dict(expert_scope="linear", router="test_threshold", router_args={"ratio": 0.3}, top_k=2,
                          targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
    "kind": dict(method="test_bias", targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
}


def _export(root):
    import megatron_mole as mm
    from megatron_mole.checkpoint import adapters, verify
    from megatron_mole.checkpoint.convert import hf_to_mcore
    from megatron_mole.checkpoint.mcore import load_model
    from megatron_mole.training.memory import adapter_params_per_layer, shapes_from_hf_config
    from tests.test_convert import make_hf_model

    make_hf_model("llama", f"{root}/hf")
    hf_to_mcore(f"{root}/hf", f"{root}/mcore")
    shapes = shapes_from_hf_config(json.load(open(f"{root}/hf/config.json")))
    out = {}
    for case, fields in EXPORTS.items():
        cfg = mm.MoLEConfig(num_experts=4, rank=4, alpha=8, lora_b_init="random", seed=7, **fields)
        model = mm.apply_mole(load_model(f"{root}/mcore", params_dtype=torch.float32), cfg)
        with torch.no_grad():  # the temperature and the bias deltas start at 0 / small: make them matter
            for name, p in model.named_parameters():
                if p.requires_grad and ("log_temperature" in name or "delta_bias" in name):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)
        sd = mm.adapter_state_dict(model)
        adapters.save_adapter(f"{root}/{case}/saved", sd, cfg, {"checkpoint": f"{root}/mcore"})
        spec = json.load(open(f"{root}/mcore/mcore_config.json"))
        adapters.export_adapter(sd, cfg, spec, f"{root}/{case}/adapter")
        counted = adapter_params_per_layer(shapes, cfg, tp=1, ep=1)
        out[case] = {
            "diff": verify.max_logits_difference(f"{root}/hf", f"{root}/mcore", adapter=f"{root}/{case}/adapter",
                                                 seq=16),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "counted": shapes.layers * sum(counted.values()),
            "names": sorted(sd),
        }
    return out


def test_toy_router_and_kind_export_to_transformers_and_count(tmp_path):
    (res,) = run_distributed(_export, 1, str(tmp_path), timeout=600)
    for case, r in res.items():
        assert r["diff"] <= 1e-4, (case, r["diff"])
        assert r["trainable"] == r["counted"], (case, r["trainable"], r["counted"])
    assert "decoder.layers.0.mlp.mole.router.log_temperature" in res["router_mlp"]["names"]
    assert "decoder.layers.1.self_attention.linear_qkv.bias_delta.bias" in res["kind"]["names"]


def test_model_supplied_routing_inputs_reach_the_router():
    """``routing_inputs`` hands a conditioning tensor, packed-sequence ids and a padding
    mask to every router of the forward passes inside it (rows s-major), and nothing after."""
    from megatron_mole.config import MoLEConfig
    from megatron_mole.layers.context import routing_inputs
    from megatron_mole.layers.linear import MoLELinear

    layer = MoLELinear(nn.Linear(4, 4), MoLEConfig(num_experts=2, expert_scope="linear", router="test_threshold"))
    seen = []
    layer.router.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    x = torch.randn(3, 2, 4)  # [s, b, h]
    condition, segments = torch.randn(2, 5), torch.tensor([[1, 1, 2], [1, 0, 0]])
    with routing_inputs(padding_mask=segments == 0, segment_ids=segments, condition=condition):
        layer(x)
    layer(x)
    inside, after = seen
    assert inside.condition is condition and inside.seq_len == 3 and inside.batch == 2
    assert inside.segment_ids_T.tolist() == segments.t().reshape(-1).tolist()
    assert inside.mask_T.tolist() == (segments != 0).t().reshape(-1).tolist()
    assert after.condition is None and after.mask_T is None and after.segment_ids_T is None
