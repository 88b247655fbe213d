"""Activation recompute with MoLE: none = selective = full, gradients to 1e-6.

One 2-process launch, Megatron's GPTModel (local spec) with dropout everywhere
(attention, hidden, adapter inputs) and MoLE top-2 with random B, at three layouts:
TP2 + SP (scope "mlp", local dispatch, SP collectives shared with the base), EP2
(scope "mlp", all-to-all) and EP2 with scope "linear" (every linear routed, all-to-all).
At the EP2 layouts the model gets a padding mask: the router leaves padding out of its
balance loss, and the mask reaches a recomputed layer only through the recompute guard
(layers/context.py), so a replay without it gives other router gradients.

Each recompute setting (none; selective; full uniform 1; full block 1; not every one at
every layout, to keep the launch short) runs the same two
micro-batches from the same RNG state; every adapter gradient must be non-zero (the PEFT
failure mode: recompute silently dropping adapter gradients) and equal to recompute
none's; the router statistics (aux tracker, load counts, global balance sums) must count
each forward once.
"""
from tests._dist import run_distributed

LAYOUTS = [
    dict(tp=2, ep=1, sp=True, scope="mlp", dispatch="local", padding=False,
         modes=("none", "selective", "full-uniform")),
    dict(tp=1, ep=2, sp=False, scope="mlp", dispatch="alltoall", padding=True, modes=("none", "full-block")),
    dict(tp=1, ep=2, sp=False, scope="linear", dispatch="alltoall", padding=True, modes=("none", "full-uniform")),
]
MODES = {
    "none": {},
    "selective": dict(recompute_granularity="selective"),
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
}


def _run():
    import torch

    import megatron_mole as mm
    from megatron_mole.routing import AUX_LOSS_TRACKER, set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from megatron_mole.training.logging import RouterLoadMonitor
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    tokens = _models.make_batches(1, global_batch=2, seed=5)[0]
    set_aux_loss_scale(1.0)
    out = []
    for layout in LAYOUTS:
        results = {}
        for mode in layout["modes"]:
            overrides = MODES[mode]
            set_model_parallel(tp=layout["tp"], ep=layout["ep"], seed=77)  # same RNG state per mode
            model, _ = _models.build_gpt(sequence_parallel=layout["sp"], hidden_dropout=0.1,
                                         attention_dropout=0.1, **overrides)
            _models.seed_full_params(model, seed=3)
            cfg = mm.MoLEConfig(num_experts=4, rank=4, alpha=8, seed=11, top_k=2, expert_scope=layout["scope"],
                                lora_b_init="random", aux_loss_coeff=0.01, z_loss_coeff=0.001, dropout=0.1,
                                dispatch=layout["dispatch"], balance="global",
                                targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
            mm.apply_mole(model, cfg)
            model.train()
            monitor = RouterLoadMonitor(model)
            AUX_LOSS_TRACKER.reset()
            for micro in tokens.split(1):  # two micro-batches, gradients accumulate
                inputs, labels = micro[:, :-1], micro[:, 1:]
                position_ids = torch.arange(inputs.shape[1])[None]
                kwargs = {}
                if layout["padding"]:
                    pad = torch.zeros_like(inputs, dtype=torch.bool)
                    pad[:, -5:] = True
                    kwargs["padding_mask"] = pad
                model(inputs, position_ids, None, labels=labels, **kwargs).sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            stats = AUX_LOSS_TRACKER.calls()
            balance = {n: b.tolist() for n, b in model.named_buffers() if n.endswith("_balance_n")}
            results[mode] = dict(grads=grads, tracker_counts=stats, load=monitor.collect(), balance=balance)
            monitor.remove()
        ref = results["none"]["grads"]
        summary = {}  # plain values: tensors do not cross the result queue
        for mode, got in results.items():
            grads = got.pop("grads")
            got["names"] = sorted(grads)
            got["smallest_grad"] = min(float(g.abs().max()) for g in grads.values())
            got["max_rel_err"] = max(float((g - ref[n]).abs().max() / ref[n].abs().max()) for n, g in grads.items())
            summary[mode] = got
        out.append(summary)
    set_aux_loss_scale(None)
    return out


def test_recompute_gradient_parity():
    per_rank = run_distributed(_run, 2, timeout=600)
    for rank, out in enumerate(per_rank):
        for layout, results in zip(LAYOUTS, out):
            ref = results["none"]
            assert ref["names"] and ref["load"] and ref["tracker_counts"], layout
            for mode, got in results.items():
                where = (rank, layout, mode)
                assert got["names"] == ref["names"], where
                assert got["smallest_grad"] > 0, (where, "an adapter gradient is zero")
                assert got["max_rel_err"] <= 1e-6, (where, got["max_rel_err"])
                assert got["tracker_counts"] == ref["tracker_counts"], where
                assert got["load"] == ref["load"], where
                assert got["balance"] == ref["balance"], where
