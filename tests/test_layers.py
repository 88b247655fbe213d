"""MoLE layer math: the fast path (sort once, grouped matmuls, one combine)
against a plain per-token PyTorch loop, and against PEFT's LoraLayer.

Single device: the wrappers around plain ``nn.Linear`` bases use the
NoParallel placement; the tensor/pipeline-parallel placement is covered by
test_layers_parallel.py. Routing is injected (random experts, experts with no
token, k up to E) and its gates are leaves, so their gradients are checked too.

Legend: T tokens, K top-k, E experts, R rank, H hidden, F ffn.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_mole.config import MoLEConfig
from megatron_mole.layers.linear import LoRALinear, MoLELinear
from megatron_mole.layers.mole_mlp import MoLEMLP
from megatron_mole.routing import Routing



@pytest.fixture(autouse=True)
def _float64():
    """fp64 so that two summation orders compare tightly (PEFT tests pick fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _random_routing(T, E, K, seed, skip_expert=None):
    gen = torch.Generator().manual_seed(seed)
    choices = [e for e in range(E) if e != skip_expert]
    idx = torch.stack([torch.tensor(choices)[torch.randperm(len(choices), generator=gen)[:K]]
                       for _ in range(T)])
    gates = torch.rand(T, K, generator=gen).requires_grad_()
    return Routing(expert_idx_TK=idx, gates_TK=gates, probs_TE=torch.zeros(T, E),
                   logits_TE=torch.zeros(T, E))


def _inject(wrapper, routing):
    wrapper.router.forward = lambda x, ctx=None, reduce_logits=None: routing


def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CASES = [  # T, E, K, skip one expert
    (10, 4, 1, False), (10, 4, 2, False), (7, 3, 3, False), (9, 5, 2, True), (1, 2, 1, False),
]


@pytest.mark.parametrize("T,E,K,skip", CASES)
def test_linear_scope_fast_path_equals_per_token_loop(T, E, K, skip):
    cfg = MoLEConfig(num_experts=E, top_k=K, rank=3, alpha=6, expert_scope="linear")
    layer = MoLELinear(torch.nn.Linear(5, 4), cfg)
    _randomize(layer, 1)
    routing = _random_routing(T, E, K, seed=T + E, skip_expert=E - 1 if skip else None)
    _inject(layer, routing)
    x = torch.randn(T, 1, 5, requires_grad=True)
    dy = torch.randn(T, 1, 4)
    (layer(x) * dy).sum().backward()

    W, b = layer.base.weight.detach(), layer.base.bias.detach()
    A = layer.mole.lora_a.detach().clone().requires_grad_()
    B = layer.mole.lora_b.detach().clone().requires_grad_()
    gates = routing.gates_TK.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    outs = []
    for t in range(T):
        y = W @ x2[t, 0] + b
        for j in range(K):
            e = routing.expert_idx_TK[t, j]
            y = y + gates[t, j] * cfg.scaling * (B[e] @ (A[e] @ x2[t, 0]))
        outs.append(y)
    (torch.stack(outs)[:, None] * dy).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.mole.lora_a.grad, A.grad)
    torch.testing.assert_close(layer.mole.lora_b.grad, B.grad)
    torch.testing.assert_close(routing.gates_TK.grad, gates.grad)
    assert layer.base.weight.grad is not None  # plain nn.Linear here: freezing is apply_mole's job


class _MLP(torch.nn.Module):
    """Megatron's MLP interface on nn.Linear: fc1 (fused gate|up when gated), act, fc2."""

    def __init__(self, hidden, ffn, gated, act):
        super().__init__()
        self.config = SimpleNamespace(gated_linear_unit=gated, activation_func=act)
        self.linear_fc1 = torch.nn.Linear(hidden, ffn * (2 if gated else 1))
        self.linear_fc2 = torch.nn.Linear(ffn, hidden)

    def act(self, z):
        if self.config.gated_linear_unit:
            g, u = z.chunk(2, -1)
            return self.config.activation_func(g) * u
        return self.config.activation_func(z)

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x))), None


@pytest.mark.parametrize("gated,act", [(True, F.silu), (False, F.gelu)])
@pytest.mark.parametrize("T,E,K,skip", CASES)
def test_mlp_scope_fast_path_equals_per_token_loop(T, E, K, skip, gated, act):
    cfg = MoLEConfig(num_experts=E, top_k=K, rank=3, alpha=6, expert_scope="mlp")
    base = _MLP(6, 5, gated, act)
    layer = MoLEMLP(base, cfg)
    _randomize(layer, 2)
    routing = _random_routing(T, E, K, seed=3 * T + E, skip_expert=0 if skip else None)
    _inject(layer, routing)
    x = torch.randn(T, 1, 6, requires_grad=True)
    dy = torch.randn(T, 1, 6)
    out, bias = layer(x)
    assert bias is None
    (out * dy).sum().backward()

    W1, b1 = base.linear_fc1.weight.detach(), base.linear_fc1.bias.detach()
    W2, b2 = base.linear_fc2.weight.detach(), base.linear_fc2.bias.detach()
    leaves = {n: p.detach().clone().requires_grad_() for n, p in
              [("A1", layer.fc1.lora_a), ("B1", layer.fc1.lora_b), ("A2", layer.fc2.lora_a),
               ("B2", layer.fc2.lora_b), ("p", routing.gates_TK)]}
    A1, B1, A2, B2, p = (leaves[n] for n in ("A1", "B1", "A2", "B2", "p"))
    x2 = x.detach().clone().requires_grad_()
    s = cfg.scaling
    outs = []
    for t in range(T):
        xt = x2[t, 0]
        g_hat = p[t] / p[t].sum()
        hbar, y_ad = 0, 0
        for j in range(K):
            e = routing.expert_idx_TK[t, j]
            h = base.act(W1 @ xt + b1 + p[t, j] * s * (B1[e] @ (A1[e] @ xt)))
            hbar = hbar + g_hat[j] * h
            y_ad = y_ad + p[t, j] * s * (B2[e] @ (A2[e] @ h))
        outs.append(W2 @ hbar + b2 + y_ad)
    (torch.stack(outs)[:, None] * dy).sum().backward()
    torch.testing.assert_close(out, torch.stack(outs)[:, None])
    torch.testing.assert_close(x.grad, x2.grad)
    for name, param in [("A1", layer.fc1.lora_a), ("B1", layer.fc1.lora_b),
                        ("A2", layer.fc2.lora_a), ("B2", layer.fc2.lora_b), ("p", routing.gates_TK)]:
        torch.testing.assert_close(param.grad, leaves[name].grad, msg=name)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_mlp_scope_with_zero_b_is_the_frozen_mlp(K):
    cfg = MoLEConfig(num_experts=4, top_k=K, rank=2, expert_scope="mlp")  # B zero-initialised
    base = _MLP(6, 5, True, F.silu)
    layer = MoLEMLP(base, cfg)
    layer.init_adapters(cfg.seed)
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(8, 2, 6)
    torch.testing.assert_close(layer(x)[0], base(x)[0])


# ---------------------------------------------------------------- PEFT
def _peft_linear(base, A, B, alpha):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    config = LoraConfig(r=A.shape[0], lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config, r=A.shape[0], lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


@pytest.mark.parametrize("cls,scope", [(LoRALinear, "mlp"), (MoLELinear, "linear")])
def test_one_expert_equals_peft_lora(cls, scope):
    torch.set_default_dtype(torch.float32)
    try:
        cfg = MoLEConfig(num_experts=1, top_k=1, rank=4, alpha=8, expert_scope=scope,
                         lora_b_init="random")
        base = torch.nn.Linear(12, 10)
        ours = cls(torch.nn.Linear(12, 10), cfg)
        ours.base.load_state_dict(base.state_dict())
        ours.adapter_prefix = "decoder.layers.0.self_attention.linear_qkv"
        ours.init_adapters(cfg.seed)
        lora = ours.lora if cls is LoRALinear else ours.mole
        A, B = lora.lora_a.detach().reshape(4, 12), lora.lora_b.detach().reshape(10, 4)
        peft = _peft_linear(base, A, B, alpha=8)
        x = torch.randn(6, 3, 12)
        x2 = x.clone().requires_grad_()
        x = x.requires_grad_()
        y, y_peft = ours(x), peft(x2)
        assert (y - y_peft).abs().max() <= 1e-6
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        (y_peft * dy).sum().backward()
        assert (x.grad - x2.grad).abs().max() <= 1e-6
        assert (lora.lora_a.grad.reshape(4, 12) - peft.lora_A["default"].weight.grad).abs().max() <= 1e-6
        assert (lora.lora_b.grad.reshape(10, 4) - peft.lora_B["default"].weight.grad).abs().max() <= 1e-6
    finally:
        torch.set_default_dtype(torch.float64)


def test_one_expert_mlp_scope_equals_peft_lora_on_fc1_and_fc2():
    torch.set_default_dtype(torch.float32)
    try:
        cfg = MoLEConfig(num_experts=1, top_k=1, rank=4, alpha=8, lora_b_init="random")
        base = _MLP(8, 6, True, F.silu)
        ours = MoLEMLP(base, cfg)
        ours.adapter_prefix = "decoder.layers.0.mlp"
        ours.init_adapters(cfg.seed)
        fc1 = _peft_linear(torch.nn.Linear(8, 12), ours.fc1.lora_a[0].detach(), ours.fc1.lora_b[0].detach(), 8)
        fc2 = _peft_linear(torch.nn.Linear(6, 8), ours.fc2.lora_a[0].detach(), ours.fc2.lora_b[0].detach(), 8)
        fc1.base_layer.load_state_dict(base.linear_fc1.state_dict())
        fc2.base_layer.load_state_dict(base.linear_fc2.state_dict())
        x = torch.randn(5, 2, 8)
        y = ours(x)[0]
        y_peft = fc2(base.act(fc1(x)))
        assert (y - y_peft).abs().max() <= 1e-6
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("K", [1, 2])
def test_bf16_model_keeps_dtypes_and_routes_in_fp32(K):
    """A bf16 base: activations and adapter grads stay bf16, the router fp32,
    and the output follows the fp32 computation within bf16 precision."""
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        base = _MLP(16, 24, True, F.silu).to(dtype)
        cfg = MoLEConfig(num_experts=4, top_k=K, rank=4, lora_b_init="random")
        layer = MoLEMLP(base, cfg)
        layer.init_adapters(cfg.seed)
        torch.nn.init.normal_(layer.router.weight, generator=torch.Generator().manual_seed(1))
        x = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
        y, _ = layer(x.requires_grad_())
        y.float().sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and layer.fc1.lora_a.grad.dtype == dtype
        assert layer.router.weight.dtype == torch.float32 == layer.router.weight.grad.dtype
        outs[dtype] = y.detach().double()
    torch.testing.assert_close(outs[torch.bfloat16], outs[torch.float32], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("K", [1, 2])
def test_empty_batch(K):
    mlp = MoLEMLP(_MLP(6, 5, True, F.silu), MoLEConfig(num_experts=3, top_k=K, rank=2))
    lin = MoLELinear(torch.nn.Linear(6, 4), MoLEConfig(num_experts=3, top_k=K, rank=2,
                                                       expert_scope="linear"))
    x = torch.randn(0, 2, 6, requires_grad=True)
    y = mlp(x)[0] + lin(x).sum(-1, keepdim=True)
    y.sum().backward()
    assert y.shape == (0, 2, 6) and x.grad.shape == (0, 2, 6)
