"""MoLE adapters inside Megatron's own GPTModel train identically at every layout.

One 4-process launch runs every layout (``set_model_parallel`` switches them);
the same global batch is split over the data-parallel ranks (TP1×DP4,
TP2+SP×DP2, PP2×DP2, TP2×PP2×DP1), one sequence per micro-batch, so the
router's balance loss (a function of its micro-batch) sees the same tokens at
every layout. Base weights come from per-tensor seeds (tests/_models.py),
adapter weights from MoLEConfig.seed (layout-independent by construction).

Cases: expert_scope "mlp" at top-2 with B zero-initialised (the adapters
contribute from step 2 on) and "linear" at top-2 with random B (they
contribute from step 1), both with adapters on linear_qkv, linear_proj,
linear_fc1, linear_fc2, 4 experts and non-zero aux/z-loss coefficients.
At TP2+SP the base weights lose Megatron's ``partition_stride`` attribute (as
with ``perform_initialization=False``), so the SwiGLU fc1 stride comes from
the MLP. Also checked at every layout: base parameters never change and never receive
a gradient; replicated adapter params stay bit-identical over TP ranks;
adapter_state_dict has the same names; and the adapter saved at TP2+SP loads
at TP1 and gives the same per-token losses. At TP2+SP the bytes through TP
collectives of one forward + backward are measured against the frozen base's.

With megatron-core >= 0.19 the same launch also trains Megatron's HybridModel of the
same base (pattern "*-*-", runtime/hybrid.py) at TP2+SP and TP2xPP2: same losses as the
GPTModel at TP1, same adapter names; and the GPT adapter saved at TP2+SP loads into the
HybridModel at TP1 with the same per-token losses.
"""
import pytest

from tests._dist import run_distributed

LAYOUTS = [
    dict(tp=1, pp=1, sp=False),
    dict(tp=2, pp=1, sp=True),
    dict(tp=1, pp=2, sp=False),
    dict(tp=2, pp=2, sp=False),
]
HYBRID_LAYOUTS = [
    dict(tp=2, pp=1, sp=True, hybrid=True),
    dict(tp=2, pp=2, sp=False, hybrid=True),
]


def _layouts():
    from megatron_mole.runtime import compat
    return LAYOUTS + (HYBRID_LAYOUTS if compat.hybrid_unavailable_reason() is None else [])
CASES = {
    "mlp_top2_zeroB": dict(expert_scope="mlp", top_k=2, lora_b_init="zeros"),
    "linear_top2_randomB": dict(expert_scope="linear", top_k=2, lora_b_init="random"),
}
STEPS, GLOBAL_BATCH = 4, 4


def _cfg(case, seed=11):
    import megatron_mole as mm
    return mm.MoLEConfig(num_experts=4, rank=4, alpha=8, seed=seed, aux_loss_coeff=0.01,
                         z_loss_coeff=0.001,
                         targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
                         **CASES[case])


def _token_losses(model, tokens):
    """Per-token losses of a fixed batch (same on every rank), on the last stage."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)

    def step(it, chunk):
        next(it)
        return chunk(inputs, pos, None, labels=labels), lambda out: (out.sum(), {"t": out.detach().clone()})

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([0]), model=[model], num_microbatches=1,
            seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0], forward_only=True)
    return out[0]["t"] if ps.is_pipeline_last_stage() else None


def _replicated_params_identical_over_tp(model):
    import torch
    from megatron.core import parallel_state as ps
    group = ps.get_tensor_model_parallel_group()
    worst = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad and not getattr(p, "tensor_model_parallel", False):
            pieces = [torch.empty_like(p) for _ in range(group.size())]
            torch.distributed.all_gather(pieces, p.detach().contiguous(), group=group)
            worst = max(worst, max(float((q - pieces[0]).abs().max()) for q in pieces))
    return worst


def _run_all():
    out = {case: _run(case) for case in sorted(CASES)}
    out["sp_bytes"] = _sp_bytes()
    return out


def _sp_bytes():
    """Bytes per rank through TP collectives for one forward + backward at TP2+SP:
    each case's adapted model over the frozen base alone (Megatron's own layers)."""
    import torch
    from megatron.core import parallel_state as ps

    import megatron_mole as mm
    from megatron_mole.runtime import set_model_parallel
    from tests import _models
    from tests._comm import collective_bytes

    set_model_parallel(tp=2, pp=1)
    tokens = _models.make_batches(1, global_batch=1, seed=5)[0]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(inputs.shape[1])[None]
    out = {}
    from megatron_mole.layers.parallel import TPPlacement

    sharing = TPPlacement.shares_sp_collectives
    for case, share in [(None, True)] + [(c, s) for c in sorted(CASES) for s in (True, False)]:
        model, _ = _models.build_gpt(sequence_parallel=True)
        _models.seed_full_params(model, seed=3)
        for p in model.parameters():  # frozen linears: no weight-gradient all-gathers
            p.requires_grad_(False)
        if case is not None:
            mm.apply_mole(model, _cfg(case))
        model.embedding.word_embeddings.weight.requires_grad_(True)  # a gradient through every layer
        TPPlacement.shares_sp_collectives = sharing if share else (lambda self, base=None: False)
        try:
            with collective_bytes(ps.get_tensor_model_parallel_group()) as moved:
                model(inputs, pos, None, labels=labels).sum().backward()
        finally:
            TPPlacement.shares_sp_collectives = sharing
        out[(case or "base") + ("" if share else " unshared")] = moved["bytes"]
    return out


def _run(case):
    import torch
    import megatron_mole as mm
    from megatron_mole.routing import set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)  # a second call returns the same runtime
    batches = _models.make_batches(STEPS, global_batch=GLOBAL_BATCH)
    eval_tokens = _models.make_batches(1, global_batch=2, seed=99)[0]
    out = {"losses": [], "names": [], "base_ok": [], "tp_replica_diff": [], "layouts": _layouts()}
    for layout in out["layouts"]:
        set_model_parallel(tp=layout["tp"], pp=layout["pp"])
        model, config = _models.build_gpt(sequence_parallel=layout["sp"], hybrid=layout.get("hybrid", False))
        _models.seed_full_params(model, seed=3)
        base = [(p, p.detach().clone()) for p in model.parameters()]
        if layout["sp"]:
            # as after perform_initialization=False: the adapters' TP placement then
            # derives the SwiGLU fc1 stride from the MLP instead of the weight
            for p in model.parameters():
                if hasattr(p, "partition_stride"):
                    del p.partition_stride
        mm.apply_mole(model, _cfg(case))
        dp = torch.distributed.get_world_size() // (layout["tp"] * layout["pp"])
        set_aux_loss_scale(dp / GLOBAL_BATCH)  # = 1 / micro-batches per rank, as the main loss
        out["losses"].append(_models.train(model, config, batches, lr=0.5))
        out["base_ok"].append(all(
            not p.requires_grad and p.grad is None and getattr(p, "main_grad", None) is None
            and torch.equal(p, before) for p, before in base))
        out["tp_replica_diff"].append(_replicated_params_identical_over_tp(model))
        sd = mm.adapter_state_dict(model)
        out["names"].append(sorted(sd))
        if layout["tp"] == 2 and layout["pp"] == 1 and not layout.get("hybrid"):
            saved_sd, saved_losses = sd, _token_losses(model, eval_tokens)
    set_aux_loss_scale(None)
    # the adapter saved at TP2+SP loads at TP1 (into the HybridModel too): same outputs
    set_model_parallel(tp=1, pp=1)
    out["reload_diff"] = []
    for hybrid in sorted({bool(layout.get("hybrid")) for layout in out["layouts"]}):
        model, config = _models.build_gpt(hybrid=hybrid)
        _models.seed_full_params(model, seed=3)
        mm.apply_mole(model, _cfg(case, seed=12345))  # other init: the load must overwrite it
        mm.load_adapter_state_dict(model, saved_sd)
        got = _token_losses(model, eval_tokens)
        out["reload_diff"].append(float((got - saved_losses).abs().max()))
    out["reload_scale"] = float(saved_losses.abs().max())
    return out


@pytest.fixture(scope="module")
def launch():
    """Both cases in one 4-process launch (process start-up costs seconds)."""
    return run_distributed(_run_all, 4, timeout=600)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mole_parity_tp_sp_pp(launch, case):
    per_rank = [r[case] for r in launch]
    res = per_rank[0]
    print(case, {str(l): v for l, v in zip(res["layouts"], res["losses"])})
    ref = res["losses"][0]
    assert ref[-1] < ref[0], f"loss did not decrease: {ref}"
    for layout, losses in zip(res["layouts"][1:], res["losses"][1:]):
        for step, (a, b) in enumerate(zip(ref, losses)):
            assert abs(a - b) <= 1e-5 * abs(a), (case, layout, step, a, b)
    for rank, r in enumerate(per_rank):
        assert all(r["base_ok"]), (rank, r["base_ok"])
        assert max(r["tp_replica_diff"]) == 0.0, (rank, r["tp_replica_diff"])
        assert all(names == r["names"][0] for names in r["names"]), rank
        assert max(r["reload_diff"]) <= 1e-5 * r["reload_scale"], (rank, r["reload_diff"])
    # (routers carry their balance state, balance="global")
    assert len(res["names"][0]) == {"mlp": 2 * (4 + 5 + 1), "linear": 2 * 4 * 4}[CASES[case]["expert_scope"]]
    # Under TP2+SP the adapters share the base's all-gathers and reduce-scatters: beyond what
    # Megatron's frozen layers move, only rank-r activations, gates and router logits cross
    # TP ranks (hidden 64, rank 4, top-2); without the sharing they move much more.
    moved = launch[0]["sp_bytes"]
    ratio, unshared = moved[case] / moved["base"], moved[case + " unshared"] / moved["base"]
    print(case, "TP2+SP bytes over the frozen base:", round(ratio, 3), "unshared:", round(unshared, 3), moved)
    assert ratio < 1.3 and unshared > ratio + 0.3, (case, ratio, unshared, moved)


def test_hybrid_model_layouts_in_the_launch(launch):
    """The HybridModel layouts ran (megatron-core >= 0.19) and matched GPTModel above."""
    from megatron_mole.runtime import compat
    reason = compat.hybrid_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    res = launch[0][sorted(CASES)[0]]
    assert [l for l in res["layouts"] if l.get("hybrid")] == HYBRID_LAYOUTS
    assert len(res["reload_diff"]) == 2  # GPTModel and HybridModel at TP1
