"""PERFT on a tiny Mixtral-like Megatron GPTModel (4 experts, top-2, 2 layers, hidden 64).

One 4-process launch:

- every variant (S, D, R, E; plus attention LoRA) trains 2 SGD steps with the same
  losses at EP1 (DP4), EP2 (DP4) and TP2+SP x EP2 (DP2), relative <= 1e-5, the adapter
  trained at TP2xEP2 reloading at EP1 with the same per-token losses;
- against plain-PyTorch references, on one MoE block at EP1: PERFT-E's adapter for
  expert e receives exactly the rows the frozen base router sent to e, with that
  router's gates, and the block's output moves by sum_e g_e s B_e A_e x; PERFT-R's
  output moves by sum_{topK} g_i s B_i A_i x with g its OWN router's probabilities
  (renormalised over K, as the Mixtral-like base renormalises), not the base router's;
  S and D by s B A x and sum_i s B_i A_i x.

Cheap single-process checks: parameter counts of the paper's Mixtral configurations
and the configuration errors.
"""
import pytest

from tests._dist import run_distributed

LAYOUTS = [dict(tp=1, ep=1, sp=False), dict(tp=1, ep=2, sp=False), dict(tp=2, ep=2, sp=True)]
STEPS, GLOBAL_BATCH = 2, 4
VARIANTS = {
    "perft-s": dict(num_experts=1),
    "perft-d": dict(num_experts=2),
    "perft-r": dict(num_experts=4, top_k=2, dispatch="alltoall"),
    "perft-e": dict(),
}


def _cfg(method, seed=5):
    import megatron_mole as mm

    return mm.MoLEConfig(method=method, rank=4, alpha=8, seed=seed, lora_b_init="random", aux_loss_coeff=0.01,
                         targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], **VARIANTS[method])


def _build(method, sp=False, seed=5):
    import megatron_mole as mm
    from tests import _models

    model, config = _models.build_gpt(moe=True, sequence_parallel=sp)
    _models.seed_full_params(model, seed=3)
    mm.apply_mole(model, _cfg(method, seed))
    return model, config


def _block_references(method):
    """max |(adapted - frozen block output) - plain-PyTorch reference| on layer 0's block,
    and for PERFT-E whether the expert rows / gates are the base router's."""
    import torch

    model, _ = _build(method)
    block = model.decoder.layers[0].mlp
    cfg, s = block.cfg, block.cfg.scaling
    x = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(1))
    a, b = block.adapters.lora_a.detach(), block.adapters.lora_b.detach()
    x_TH = x.reshape(-1, 64)
    seen = {}
    out = {}
    with torch.no_grad():
        if method == "perft-e":
            hook = block.base.experts.register_forward_hook(lambda m, args, o: seen.update(args=args))
        adapted = block(x)[0].reshape(-1, 64)
        if method == "perft-e":
            hook.remove()
        saved = b.clone()
        block.adapters.lora_b.zero_()
        frozen = block(x)[0].reshape(-1, 64)
        block.adapters.lora_b.copy_(saved)
        if method == "perft-s":
            ref = s * x_TH @ a.t() @ b.t()
        elif method == "perft-d":
            ref = sum(s * x_TH @ a[i].t() @ b[i].t() for i in range(a.shape[0]))
        elif method == "perft-r":
            p = torch.softmax(x_TH @ block.router.weight.detach().t(), -1)
            g, idx = p.topk(cfg.top_k, -1)
            g = g / g.sum(-1, keepdim=True)  # the base (Megatron default, Mixtral) renormalises
            ref = torch.zeros_like(x_TH)
            for t in range(x_TH.shape[0]):
                for k in range(cfg.top_k):
                    e = idx[t, k]
                    ref[t] += g[t, k] * s * (b[e] @ (a[e] @ x_TH[t]))
            # the base router's gates would give another output: the check can tell them apart
            bp, bmap = block.base.router(x)
            out["base_gate_gap"] = float((bp[bmap.bool()].view(-1, 2) - g).abs().max())
        else:  # perft-e: the frozen base router's choice and gates
            probs_TE, map_TE = block.base.router(x)
            ref = torch.zeros_like(x_TH)
            rows, counts, gates = seen["args"]
            start, exact = 0, True
            for e in range(a.shape[0]):
                tok = map_TE[:, e].bool().nonzero().squeeze(-1)
                n = int(counts[e])
                exact &= n == tok.numel() and torch.equal(rows[start:start + n], x_TH[tok]) \
                    and torch.equal(gates[start:start + n], probs_TE[tok, e])
                start += n
                ref[tok] += probs_TE[tok, e, None] * s * (x_TH[tok] @ a[e].t() @ b[e].t())
            out["rows_exact"] = bool(exact)
    out["delta_err"] = float(((adapted - frozen) - ref).abs().max() / ref.abs().max())
    out["delta_size"] = float(ref.abs().max())
    return out


def _config_errors():
    """The messages of refused configurations, and whether the base router's Megatron losses are off."""
    import megatron_mole as mm
    from tests import _models

    out = {}
    attempts = {
        "perft_s_experts": dict(method="perft-s", num_experts=4),
        "some_experts": dict(method="perft-r", targets=["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"]),
        "shared_expert": dict(method="perft-d", targets=["decoder.layers.0.mlp.shared_experts.linear_fc1"]),
        "mole_into_experts": dict(method="mole", targets=["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"]),
    }
    for name, fields in attempts.items():
        model, _ = _models.build_gpt(moe=True, moe_shared_expert_intermediate_size=32)
        try:
            mm.apply_mole(model, mm.MoLEConfig(**fields))
            out[name] = None
        except Exception as err:  # noqa: BLE001  (the test checks the type and message)
            out[name] = f"{type(err).__name__}: {err}"
    model, config = _models.build_gpt(moe=True, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    mm.apply_mole(model, mm.MoLEConfig(method="perft-e"))
    router = model.decoder.layers[0].mlp.base.router
    out["base_losses_off"] = (router.config.moe_aux_loss_coeff == 0 and router.config.moe_z_loss_coeff is None
                              and config.moe_aux_loss_coeff == 0.01)
    return out


def _run():
    import torch

    import megatron_mole as mm
    from megatron_mole.model import update_global_balance
    from megatron_mole.routing import set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models
    from tests.test_layers_parallel import _token_losses

    mm.init_distributed(device="cpu", seed=1234)
    batches = _models.make_batches(1, global_batch=GLOBAL_BATCH).expand(STEPS, -1, -1)  # one batch: loss falls
    eval_tokens = _models.make_batches(1, global_batch=2, seed=99)[0]
    out = {"losses": {}, "refs": {}, "reload": {}}
    set_model_parallel(tp=1, ep=1)
    for method in VARIANTS:
        out["refs"][method] = _block_references(method)
    out["errors"] = _config_errors()
    saved = {}
    for layout in LAYOUTS:
        set_model_parallel(tp=layout["tp"], ep=layout["ep"])
        for method in VARIANTS:
            model, config = _build(method, sp=layout["sp"])
            set_aux_loss_scale(torch.distributed.get_world_size() // layout["tp"] / GLOBAL_BATCH)
            losses = _models.train(model, config, batches, lr=0.3, after_step=update_global_balance)
            out["losses"].setdefault(method, []).append(losses)
            if layout["tp"] == 2:
                saved[method] = (mm.adapter_state_dict(model), _token_losses(model, eval_tokens))
    set_aux_loss_scale(None)
    set_model_parallel(tp=1, ep=1)
    for method, (sd, want) in saved.items():
        model, _ = _build(method, seed=77)  # another init: the load must overwrite it
        mm.load_adapter_state_dict(model, sd)
        got = _token_losses(model, eval_tokens)
        out["reload"][method] = float((got - want).abs().max() / want.abs().max())
    return out


def test_perft_parity_and_references():
    res = run_distributed(_run, 4, timeout=900)[0]
    for method, per_layout in res["losses"].items():
        ref = per_layout[0]
        print(method, per_layout)
        assert ref[-1] < ref[0], (method, ref)
        for layout, losses in zip(LAYOUTS[1:], per_layout[1:]):
            for step, (a, b) in enumerate(zip(ref, losses)):
                assert abs(a - b) <= 1e-5 * abs(a), (method, layout, step, a, b)
        assert res["reload"][method] <= 1e-5, (method, res["reload"])
    for method, r in res["refs"].items():
        assert r["delta_size"] > 1e-3 and r["delta_err"] <= 1e-5, (method, r)
    assert res["refs"]["perft-e"]["rows_exact"]
    assert res["refs"]["perft-r"]["base_gate_gap"] > 1e-3
    errors = res["errors"]
    assert errors["perft_s_experts"].startswith("ConfigError") and "num_experts=4" in errors["perft_s_experts"]
    assert errors["some_experts"].startswith("ConfigError") and "decoder.layers.0.mlp" in errors["some_experts"]
    assert errors["shared_expert"].startswith("ConfigError") and "shared expert" in errors["shared_expert"]
    assert "perft" in errors["mole_into_experts"]
    assert errors["base_losses_off"]


def test_trainable_params_of_the_paper_configurations():
    """Mixtral-8x7B (H 4096, 32 layers, 8 experts): the PERFT paper's R(8,2,r8) = 17.8M, E r8 = 16.8M."""
    import megatron_mole as mm
    from megatron_mole.training.memory import Shapes, trainable_params

    mixtral = Shapes(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32000,
                     tied=False, base_experts=8, expert_ffn=14336, base_top_k=2)
    moe = ["linear_fc1", "linear_fc2"]

    def count(**fields):
        return trainable_params(mixtral, mm.MoLEConfig(targets=moe, **fields))

    assert count(method="perft-r", num_experts=8, top_k=2, rank=8) == 32 * 8 * (2 * 4096 * 8 + 4096) == 17_825_792
    assert count(method="perft-e", rank=8) == 32 * 8 * 2 * 4096 * 8 == 16_777_216
    assert count(method="perft-s", num_experts=1, rank=16) == 32 * 2 * 4096 * 16
    assert count(method="perft-d", num_experts=4, rank=16) == 32 * 4 * 2 * 4096 * 16
    # attention LoRA adds its own: 32 layers x r (in + out) for qkv (4096 -> 6144) and proj
    with_attention = trainable_params(mixtral, mm.MoLEConfig(method="perft-e", rank=8,
                                                             targets=moe + ["linear_qkv", "linear_proj"]))
    assert with_attention - 16_777_216 == 32 * 8 * ((4096 + 6144) + (4096 + 4096))


def test_quickstart_mixtral_config(tmp_path):
    """``quickstart --base mixtral`` trains PERFT-R (4 adapter experts, top-2) at EP=2 (the run itself is a
    README demonstration, not a test: the default quickstart's end-to-end test covers the path)."""
    import megatron_mole as mm
    from megatron_mole.training.quickstart import LAYOUT, MIXTRAL, train_config

    cfg = mm.MoLEConfig(**train_config(tmp_path, 2, 1, base="mixtral")["mole"])
    assert (cfg.method, cfg.num_experts, cfg.top_k, LAYOUT["ep"]) == ("perft-r", 4, 2, 2)
    assert MIXTRAL["num_local_experts"] == 4 and MIXTRAL["num_experts_per_tok"] == 2
    assert train_config(tmp_path, 2, 1)["mole"].get("method", "mole") == "mole"  # the default is unchanged
