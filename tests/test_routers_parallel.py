"""Each seed router trains alike at EP1, EP2 (all-to-all) and TP2+SP, in both expert
scopes, and its exported adapter gives transformers the same logits as Megatron.

One 2-process launch for the parity (every router x scope x layout), one process for
the exports. Routers use a variable number of experts per token here (dynmole's dense
tokens and top-p sets, gw's broadcast tokens), so these runs go through the unused-slot
paths of local and all-to-all dispatch and of the fused SwiGLU core.
"""
import json

import pytest
import torch

from tests._dist import run_distributed

ROUTERS = {
    "topk": {"renormalize": True},
    "dynmole": {"threshold": 0.95, "top_p": 0.6},
    "gw": {"tau": 1.2, "max_slots": 3},
    "mor": {"num_sub_routers": 2},
}
LAYOUTS = [dict(tp=1, ep=1, sp=False), dict(tp=1, ep=2, sp=False), dict(tp=2, ep=1, sp=True)]


def _cfg(router, scope, **kw):
    import megatron_mole as mm

    return mm.MoLEConfig(num_experts=4, rank=4, alpha=8, seed=5, top_k=2, expert_scope=scope, router=router,
                         router_args=ROUTERS[router], lora_b_init="random", aux_loss_coeff=0.01,
                         z_loss_coeff=0.001, **kw)


def _parity():
    import megatron_mole as mm
    from megatron_mole.routing import AUX_LOSS_TRACKER, set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    batches = _models.make_batches(1, global_batch=2).repeat(3, 1, 1)  # one batch: the loss must fall
    out = {}
    for router in ROUTERS:
        for scope in ("mlp", "linear"):
            for layout in LAYOUTS:
                set_model_parallel(tp=layout["tp"], ep=layout["ep"])
                model, config = _models.build_gpt(sequence_parallel=layout["sp"])
                _models.seed_full_params(model, seed=3)
                mm.apply_mole(model, _cfg(router, scope, dispatch="alltoall",
                                          targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))
                set_aux_loss_scale(2 // layout["tp"] / 2)
                AUX_LOSS_TRACKER.reset()
                losses = _models.train(model, config, batches, lr=0.5)
                stats = AUX_LOSS_TRACKER.report()
                out[(router, scope, str(layout))] = {
                    "losses": losses,
                    "experts_per_token": max(s["experts_per_token"] for s in stats.values()),
                }
    # the balance loss over the global batch: TP1 x DP2 (one sequence per micro-batch) and
    # TP2 x DP1 (one micro-batch of both sequences) see the same global batch
    from megatron_mole.model import update_global_balance

    batches = _models.make_batches(4, global_batch=2, seed=8)
    for balance in ("global", "micro_batch"):
        for tp, micro in ((1, 1), (2, 2)):
            set_model_parallel(tp=tp)
            model, config = _models.build_gpt()
            _models.seed_full_params(model, seed=3)
            mm.apply_mole(model, mm.MoLEConfig(num_experts=4, rank=4, top_k=2, seed=5, lora_b_init="random",
                                               aux_loss_coeff=0.5, balance=balance, targets=["linear_fc1", "linear_fc2"]))
            set_aux_loss_scale(1.0)  # one micro-batch per rank in both layouts
            out[("balance", balance, tp)] = _models.train(model, config, batches, lr=0.5, micro_batch_size=micro,
                                                          after_step=update_global_balance)
    set_aux_loss_scale(None)
    return out


def test_global_balance_does_not_depend_on_the_dp_or_micro_batch_split(parity):
    a, b = parity[("balance", "global", 1)], parity[("balance", "global", 2)]
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
    # per micro-batch, the fractions differ between the splits: so do the losses from step 2 on
    c, d = parity[("balance", "micro_batch", 1)], parity[("balance", "micro_batch", 2)]
    assert max(abs(x - y) / abs(x) for x, y in zip(c, d)) > 1e-5, (c, d)


@pytest.fixture(scope="module")
def parity():
    return run_distributed(_parity, 2, timeout=900)[0]


@pytest.mark.parametrize("router", list(ROUTERS))
def test_router_trains_alike_at_ep1_ep2_tp2_sp(parity, router):
    for scope in ("mlp", "linear"):
        ref = parity[(router, scope, str(LAYOUTS[0]))]["losses"]
        assert ref[-1] < ref[0], (router, scope, ref)
        for layout in LAYOUTS[1:]:
            got = parity[(router, scope, str(layout))]["losses"]
            assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref, got)), (router, scope, layout, ref, got)
    if router in ("dynmole", "gw"):  # some tokens used more experts than top_k = 2
        assert parity[(router, "linear", str(LAYOUTS[0]))]["experts_per_token"] > 2.0


def _export(root):
    import megatron_mole as mm
    from megatron_mole.checkpoint import adapters, verify
    from megatron_mole.checkpoint.convert import hf_to_mcore
    from megatron_mole.checkpoint.mcore import load_model
    from tests.test_convert import make_hf_model

    make_hf_model("llama", f"{root}/hf")
    hf_to_mcore(f"{root}/hf", f"{root}/mcore")
    spec = json.load(open(f"{root}/mcore/mcore_config.json"))
    out = {}
    for i, router in enumerate(ROUTERS):
        scope = ("mlp", "linear")[i % 2]
        cfg = _cfg(router, scope, targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
        model = mm.apply_mole(load_model(f"{root}/mcore", params_dtype=torch.float32), cfg)
        adapters.export_adapter(mm.adapter_state_dict(model), cfg, spec, f"{root}/{router}")
        out[router] = verify.max_logits_difference(f"{root}/hf", f"{root}/mcore", adapter=f"{root}/{router}", seq=16)
    return out


def test_exported_routers_match_in_transformers(tmp_path):
    (diffs,) = run_distributed(_export, 1, str(tmp_path), timeout=600)
    assert all(d <= 1e-4 for d in diffs.values()), diffs
