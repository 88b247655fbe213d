"""The topk router and the auxiliary losses against their formulas written out."""
import math

import pytest
import torch

from megatron_mole.config import MoLEConfig
from megatron_mole.routing import (
    AUX_LOSS_TRACKER, AuxLossTracker, attach_aux_loss, build_router, load_balancing_loss,
    set_aux_loss_scale, z_loss,
)


def _cfg(**kw):
    base = dict(num_experts=4, rank=2, top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.01, balance="micro_batch")
    base.update(kw)
    return MoLEConfig(**base)


def test_topk_router_gates_are_raw_probabilities():
    torch.manual_seed(0)
    cfg = _cfg()
    router = build_router(6, cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(7, 6, dtype=torch.bfloat16)
    r = router(x)
    for t in range(7):
        logits = [sum(float(router.weight.detach()[e, d]) * float(x[t, d]) for d in range(6)) for e in range(4)]
        m = max(logits)
        probs = [math.exp(v - m) for v in logits]
        probs = [p / sum(probs) for p in probs]
        best = sorted(range(4), key=lambda e: -probs[e])[:2]
        assert r.expert_idx_TK[t].tolist() == best
        assert r.gates_TK[t].tolist() == pytest.approx([probs[e] for e in best], rel=1e-5)
    assert r.gates_TK.dtype == torch.float32 and r.logits_TE.dtype == torch.float32


def test_load_balancing_and_z_loss_formulas_with_padding():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 4, generator=gen)
    probs = logits.softmax(-1)
    idx = probs.topk(2, -1).indices
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    keep = [t for t in range(10) if mask[t]]
    f = [sum(int(e in idx[t].tolist()) for t in keep) / (len(keep) * 2) for e in range(4)]
    P = [sum(float(probs[t, e]) for t in keep) / len(keep) for e in range(4)]
    assert float(load_balancing_loss(probs, idx, mask)) == pytest.approx(4 * sum(a * b for a, b in zip(f, P)), rel=1e-6)
    z = sum(math.log(sum(math.exp(float(v)) for v in logits[t])) ** 2 for t in keep) / len(keep)
    assert float(z_loss(logits, mask)) == pytest.approx(z, rel=1e-6)
    # uniform routing gives the balance loss's minimum 1
    uniform = torch.full((8, 4), 0.25)
    assert float(load_balancing_loss(uniform, torch.arange(8).remainder(4)[:, None])) == pytest.approx(1.0)


def test_aux_loss_reaches_router_through_backprop_with_scale():
    torch.manual_seed(2)
    cfg = _cfg()
    router = build_router(5, cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(6, 5)
    act = torch.randn(6, 3, requires_grad=True)
    try:
        set_aux_loss_scale(0.5)
        r = router(x)
        out = attach_aux_loss(act * 2, r.aux_loss)
        out.sum().backward()
        got = router.weight.grad.clone()
    finally:
        set_aux_loss_scale(None)
    router.weight.grad = None
    r = router(x)
    want_loss = 0.5 * (0.1 * load_balancing_loss(r.probs_TE, r.expert_idx_TK) + 0.01 * z_loss(r.logits_TE))
    want_loss.backward()
    torch.testing.assert_close(got, router.weight.grad)
    torch.testing.assert_close(act.grad, torch.full_like(act, 2.0))


def test_tracker_averages_per_layer():
    tr = AuxLossTracker()
    tr.record("decoder.layers.0.mlp", {"load_balance": torch.tensor(1.0)})
    tr.record("decoder.layers.0.mlp", {"load_balance": torch.tensor(3.0)})
    tr.record("decoder.layers.1.mlp", {"z_loss": torch.tensor(5.0)})
    assert tr.report() == {"decoder.layers.0.mlp": {"load_balance": 2.0},
                           "decoder.layers.1.mlp": {"z_loss": 5.0}}
    assert tr.report() == {}
    assert AUX_LOSS_TRACKER is not None


@pytest.mark.parametrize("kwargs,field", [
    (dict(rank=0), "rank"),
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(router="nope"), "router"),
    (dict(expert_scope="block"), "expert_scope"),
    (dict(dropout=1.0), "dropout"),
    (dict(alpha=0), "alpha"),
    (dict(targets=[]), "targets"),
    (dict(lora_b_init="ones"), "lora_b_init"),
    (dict(method="perft"), "method"),
    (dict(aux_loss_coeff=-1.0), "aux_loss_coeff"),
    (dict(router_args={"q": 1.1}), "router_args"),
    (dict(layers=[-1]), "layers"),
    (dict(num_experts=0), "num_experts"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MoLEConfig\.{field}="):
        MoLEConfig(**kwargs)


def test_config_from_dict_refuses_unknown_keys():
    assert MoLEConfig.from_dict(MoLEConfig(rank=3).to_dict()).rank == 3
    with pytest.raises(ValueError, match="unknown field.*'ranks'"):
        MoLEConfig.from_dict({"ranks": 4})
