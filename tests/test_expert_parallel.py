"""Expert parallelism: MoLE experts sharded over EP ranks train exactly like EP1.

One 4-process launch runs every layout: EP1, EP2 and EP4 at TP1 (DP4), and
EP2 x TP2 with and without SP (DP2; the dispatch is then split over
the TP ranks that hold the same tokens, dispatch/tp_split.py), with the same
global batch split over the data-parallel ranks (one sequence per micro-batch,
so the routers' balance losses see the same tokens everywhere) and gradients reduced by Megatron's DDP (expert params
over the expert-data-parallel group, the rest over data-parallel). Both expert
scopes, 4 experts, top-2, adapters on qkv/proj/fc1/fc2, random B so the experts
matter from step 1. Also: expert tensors live only on their owner (E/ep per
rank), carry allreduce=False, and the adapter trained at EP4 loads at EP1 and
EP2 with the same per-token losses, and one forward + backward makes one host sync
per dispatch at every layout (tests/_syncs.py).
"""
import pytest

from tests._dist import run_distributed

LAYOUTS = [
    dict(tp=1, ep=1, sp=False),
    dict(tp=1, ep=2, sp=False),
    dict(tp=1, ep=4, sp=False),
    dict(tp=2, ep=2, sp=True),
    dict(tp=2, ep=2, sp=False),
]
STEPS, GLOBAL_BATCH, EXPERTS = 4, 4, 4


def _cfg(scope, seed=11, **kw):
    import megatron_mole as mm

    return mm.MoLEConfig(num_experts=EXPERTS, rank=4, alpha=8, seed=seed, top_k=2, expert_scope=scope,
                         lora_b_init="random", aux_loss_coeff=0.01, z_loss_coeff=0.001,
                         dispatch="alltoall",
                         targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], **kw)


def _expert_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() == 3]


def _run(scope):
    import torch

    import megatron_mole as mm
    from megatron_mole.routing import set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models
    from tests.test_layers_parallel import _token_losses

    mm.init_distributed(device="cpu", seed=1234)
    batches = _models.make_batches(STEPS, global_batch=GLOBAL_BATCH)
    eval_tokens = _models.make_batches(1, global_batch=2, seed=99)[0]
    from megatron_mole.dispatch import alltoall

    from tests._syncs import count_host_syncs

    out = {"losses": [], "local_experts": [], "allreduce": [], "names": [], "ep_bytes": [], "syncs": []}
    for layout in LAYOUTS:
        set_model_parallel(tp=layout["tp"], ep=layout["ep"])
        model, config = _models.build_gpt(sequence_parallel=layout["sp"])
        _models.seed_full_params(model, seed=3)
        mm.apply_mole(model, _cfg(scope))
        experts = _expert_params(model)
        out["local_experts"].append(sorted({p.shape[0] for _, p in experts}))
        out["allreduce"].append(sorted({getattr(p, "allreduce", True) for _, p in experts}))
        dp = torch.distributed.get_world_size() // layout["tp"]
        set_aux_loss_scale(dp / GLOBAL_BATCH)
        alltoall.TRAFFIC["bytes"] = 0
        out["losses"].append(_models.train(model, config, batches, lr=0.5))
        sent = torch.tensor([float(alltoall.TRAFFIC["bytes"])])
        torch.distributed.all_reduce(sent)
        out["ep_bytes"].append(sent.item())
        # host syncs of one forward + backward: one per dispatch (the split sizes), also
        # through all-to-all and the TP split
        inputs, labels = eval_tokens[:1, :-1], eval_tokens[:1, 1:]
        with count_host_syncs() as syncs:
            model(inputs, torch.arange(inputs.shape[1])[None], None, labels=labels).sum().backward()
        out["syncs"].append(sum(syncs.values()))
        sd = mm.adapter_state_dict(model)
        out["names"].append(sorted(sd))
        if layout["ep"] == 4:
            saved_sd, saved_losses = sd, _token_losses(model, eval_tokens)
    set_aux_loss_scale(None)
    out["reload_diff"] = []
    for ep in (1, 2):
        set_model_parallel(tp=1, ep=ep)
        model, config = _models.build_gpt()
        _models.seed_full_params(model, seed=3)
        mm.apply_mole(model, _cfg(scope, seed=777))  # other init: the load must overwrite it
        mm.load_adapter_state_dict(model, saved_sd)
        got = _token_losses(model, eval_tokens)
        out["reload_diff"].append(float((got - saved_losses).abs().max() / saved_losses.abs().max()))
    return out


@pytest.mark.parametrize("scope", ["mlp", "linear"])
def test_expert_parallel_parity(scope):
    per_rank = run_distributed(_run, 4, scope, timeout=900)
    res = per_rank[0]
    print(scope, {str(l): v for l, v in zip(LAYOUTS, res["losses"])})
    ref = res["losses"][0]
    assert ref[-1] < ref[0], f"loss did not decrease: {ref}"
    for layout, losses in zip(LAYOUTS[1:], res["losses"][1:]):
        for step, (a, b) in enumerate(zip(ref, losses)):
            assert abs(a - b) <= 1e-5 * abs(a), (scope, layout, step, a, b)
    for r in per_rank:
        assert r["local_experts"] == [[EXPERTS // l["ep"]] for l in LAYOUTS]
        assert r["allreduce"] == [[l["ep"] == 1] for l in LAYOUTS]
        assert all(names == r["names"][0] for names in r["names"])
        assert max(r["reload_diff"]) <= 1e-5, r["reload_diff"]
        units = 2 if scope == "mlp" else 8  # MoLE MLPs, or routed linears (2 layers)
        assert r["syncs"] == [units] * len(LAYOUTS), r["syncs"]
    if scope == "mlp":
        # Scope "mlp" all-to-alls only over EP. The same tokens and routing at every layout: with
        # the TP split each token crosses EP once, so TP2xEP2 moves about what TP1xEP2 moves
        # (homes differ, hence the slack), not twice as much.
        ep2 = res["ep_bytes"][1]
        for i in (3, 4):
            assert 0.7 < res["ep_bytes"][i] / ep2 < 1.3, (LAYOUTS[i], res["ep_bytes"])
