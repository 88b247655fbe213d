"""The seed papers' routers against their formulas, computed by hand on small tensors.

``dynmole`` (Tsallis entropy, top-p rule, dense switch, losses), ``gw`` (entropy
broadcast of the earliest uncertain tokens per sequence, eval = topk), ``mor`` (mixture
of sub-router probabilities; one sub-router = topk) and ``topk``'s options (jitter,
renormalised gates); plus properties on random inputs and the router_args checks.
Training parity and export: tests/test_routers_parallel.py.
"""
import math

import pytest
import torch

from megatron_mole.config import MoLEConfig
from megatron_mole.routing import RoutingContext, build_router
from megatron_mole.routing.dynmole import top_p_mask, tsallis_entropy


def _router(name, dim=3, **kw):
    kw.setdefault("num_experts", 4)
    cfg = MoLEConfig(router=name, **kw)
    router = build_router(dim, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return router, cfg


def _x(t=6, dim=3, seed=1):
    return torch.randn(t, dim, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- topk
def test_topk_renormalize_and_jitter():
    plain, _ = _router("topk", top_k=2)
    renorm, _ = _router("topk", top_k=2, router_args={"renormalize": True})
    x = _x()
    a, b = plain(x), renorm(x)
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)
    torch.testing.assert_close(b.gates_TK, a.gates_TK / a.gates_TK.sum(-1, keepdim=True))
    jitter, _ = _router("topk", top_k=2, router_args={"jitter": 0.5})
    torch.manual_seed(0)
    ev = jitter(x, RoutingContext(training=False))
    tr = jitter(x, RoutingContext(training=True))
    assert torch.equal(ev.probs_TE, a.probs_TE)          # no jitter in evaluation
    assert not torch.allclose(tr.probs_TE, a.probs_TE)   # jittered input in training


# ---------------------------------------------------------------- dynmole
def test_tsallis_entropy_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    q, n = 1.1, 4
    want = [((1 - sum(v ** q for v in row)) / (q - 1)) / ((1 - n ** (1 - q)) / (q - 1)) for row in p.tolist()]
    torch.testing.assert_close(tsallis_entropy(p, q), torch.tensor(want))
    assert abs(want[1] - 1.0) < 1e-6 and want[2] == 0.0


def test_top_p_rule_excludes_the_crossing_expert_then_keeps_top_k():
    sorted_p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.7, 0.2, 0.06, 0.04]])
    # cumulative 0.5, 0.8, 0.95, 1.0 and 0.7, 0.9, ...: at 0.85 the first row keeps two
    # (0.8 <= 0.85 < 0.95), the second one (0.9 crosses 0.85 and is left out)
    assert top_p_mask(sorted_p, 0.85, 1).tolist() == [[True, True, False, False], [True, False, False, False]]
    # at 0.75 only the first is within; keep_top_k = 2 adds the second
    assert top_p_mask(sorted_p, 0.75, 2).tolist() == [[True, True, False, False], [True, True, False, False]]
    assert top_p_mask(sorted_p, 0.75, 1).tolist() == [[True, False, False, False], [True, False, False, False]]


def test_dynmole_routing_and_losses_by_hand():
    args = {"q": 1.1, "threshold": 0.9, "top_p": 0.75, "entropy_loss_coeff": 0.01}
    router, cfg = _router("dynmole", top_k=1, router_args=args, aux_loss_coeff=0.001, balance="micro_batch")
    with torch.no_grad():
        router.weight[3] *= 0.0  # some tokens near uniform (dense), others peaked
    x = torch.cat([_x(5), torch.zeros(1, 3)])  # the zero token: uniform p, S_q = 1 > 0.9
    r = router(x)
    p = torch.softmax(x @ router.weight.t(), -1).detach()
    for t in range(x.shape[0]):
        s = ((1 - sum(v ** 1.1 for v in p[t].tolist())) / 0.1) / ((1 - 4 ** -0.1) / 0.1)
        order = sorted(range(4), key=lambda e: -float(p[t, e]))
        if s > 0.9:
            chosen = set(range(4))
        else:
            chosen, cum = set(), 0.0
            for e in order:
                cum += float(p[t, e])
                if cum <= 0.75:
                    chosen.add(e)
            chosen.add(order[0])
        got = {int(e) for e, v in zip(r.expert_idx_TK[t], r.valid_TK[t]) if v}
        assert got == chosen, (t, got, chosen)
        for e, g, v in zip(r.expert_idx_TK[t], r.gates_TK[t], r.valid_TK[t]):
            assert float(g) == pytest.approx(float(p[t, e]))  # p * mask: not renormalised
    assert r.valid_TK[5].all()  # the uniform token went dense
    s_all = tsallis_entropy(p, 1.1)
    w = torch.zeros(6, 4)
    for t in range(6):
        for e, g, v in zip(r.expert_idx_TK[t], r.gates_TK[t], r.valid_TK[t]):
            w[t, e] = float(g) * bool(v)
    balance = 4 * (w.mean(0) * p.mean(0)).sum()
    torch.testing.assert_close(r.aux_losses["load_balance"], 0.001 * balance)
    torch.testing.assert_close(r.aux_losses["tsallis_entropy"], 0.01 * s_all.mean())
    assert r.stats["dense_fraction"] == pytest.approx(float((s_all > 0.9).float().mean()))


def test_dynmole_properties():
    x = _x(64, 3, seed=4) * 0.01  # near-uniform: every token would be dense at threshold 0.9
    never, _ = _router("dynmole", top_k=2, router_args={"threshold": 1.0})
    r = never(x)
    assert (r.gates_TK >= 0).all() and r.valid_TK[:, :2].all()
    assert int(r.valid_TK.sum(-1).max()) < 4 or float(r.stats["dense_fraction"]) == 0.0
    assert float(r.stats["dense_fraction"]) == 0.0
    dense, _ = _router("dynmole", top_k=2)
    assert float(dense(x).stats["dense_fraction"]) == 1.0


# ---------------------------------------------------------------- gw
def test_gw_eval_is_topk_and_training_broadcasts_the_earliest_uncertain():
    gw, _ = _router("gw", top_k=1, router_args={"tau": 0.5, "max_slots": 2})
    topk, _ = _router("topk", top_k=1)
    x = _x(12, 3, seed=2) * 0.3  # fairly uncertain routing
    with torch.no_grad():
        topk.weight.copy_(gw.weight)
    ev, ref = gw(x, RoutingContext(training=False)), topk(x)
    assert torch.equal(ev.expert_idx_TK, ref.expert_idx_TK) and torch.equal(ev.gates_TK, ref.gates_TK)
    assert ev.valid_TK is None
    # training: rows s-major over 3 sequences of 4 positions; tokens with H >= 0.5 nats,
    # the earliest two per sequence, go to all 4 experts with gates p
    ctx = RoutingContext(training=True, seq_len=4, batch=3)
    r = gw(x, ctx)
    p = torch.softmax(x @ gw.weight.t(), -1)
    entropy = -(p * p.log()).sum(-1)
    expect = torch.zeros(12, dtype=torch.bool)
    for b in range(3):
        rows = [s * 3 + b for s in range(4) if entropy[s * 3 + b] >= 0.5][:2]
        expect[rows] = True
    assert expect.any() and not expect.all()
    assert torch.equal(r.valid_TK.all(-1), expect)
    assert torch.equal(r.valid_TK.sum(-1), torch.where(expect, 4, 1))
    torch.testing.assert_close(r.gates_TK[:, 0], ref.gates_TK[:, 0])
    full = torch.zeros(12, 4).scatter(1, r.expert_idx_TK, r.gates_TK)
    torch.testing.assert_close(full[expect], p[expect])  # broadcast: every expert, weighted by p
    assert float(r.stats["broadcast_fraction"]) == pytest.approx(float(expect.float().mean()))


def test_gw_default_tau_follows_the_expert_count():
    gw, _ = _router("gw", num_experts=8)
    assert gw.tau() == pytest.approx(0.77 * math.log(8))


# ---------------------------------------------------------------- mor
def test_mor_one_sub_router_is_topk_and_two_mix_probabilities():
    one, _ = _router("mor", top_k=2, router_args={"num_sub_routers": 1})
    topk, _ = _router("topk", top_k=2)
    with torch.no_grad():
        topk.weight.copy_(one.weight[0])
    x = _x()
    a, b = one(x), topk(x)
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK) and torch.equal(a.gates_TK, b.gates_TK)
    two, _ = _router("mor", top_k=2)
    assert two.weight.shape == (2, 4, 3) and two.main_weight.shape == (2, 3)
    r = two(x)
    main = torch.softmax(x @ two.main_weight.t(), -1)
    p = main[:, :1] * torch.softmax(x @ two.weight[0].t(), -1) + main[:, 1:] * torch.softmax(x @ two.weight[1].t(), -1)
    torch.testing.assert_close(r.probs_TE, p)
    torch.testing.assert_close(r.gates_TK, p.topk(2, -1).values)


@pytest.mark.parametrize("router,args,key", [
    ("dynmole", {"q": 1.0}, "q"), ("dynmole", {"top_p": 0}, "top_p"), ("dynmole", {"tau": 1}, "tau"),
    ("gw", {"max_slots": -1}, "max_slots"), ("mor", {"num_sub_routers": 0}, "num_sub_routers"),
    ("topk", {"jitter": 1.5}, "jitter"), ("topk", {"renormalize": 1}, "renormalize"),
])
def test_bad_router_args_name_the_key(router, args, key):
    with pytest.raises(ValueError, match=rf"MoLEConfig\.router_args=.*{key}"):
        MoLEConfig(router=router, router_args=args)
