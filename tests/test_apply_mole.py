"""apply_mole on Megatron's own GPTModel (dense and MoE): target patterns,
layer selections, freezing, errors, and adapter state-dict errors; plus a
tiny run of ``megatron-mole bench layer``.

The Megatron parts run in one spawned single-process world (the CPU runtime
patches stay out of the pytest process); each test checks its part of the
results.
"""
import pytest

from megatron_mole.model import pattern_matches
from tests._dist import run_distributed

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


@pytest.mark.parametrize("pattern,path,hit", [
    ("linear_fc1", "decoder.layers.3.mlp.linear_fc1", True),
    ("linear_fc1", "decoder.layers.3.mlp.linear_fc2", False),
    ("linear_*", "decoder.layers.0.self_attention.linear_qkv", True),
    ("decoder.layers.*.mlp.linear_fc2", "decoder.layers.12.mlp.linear_fc2", True),
    ("decoder.layers.*.linear_fc2", "decoder.layers.12.mlp.linear_fc2", False),
    ("decoder.layers.{0-3}.**", "decoder.layers.3.mlp.linear_fc2", True),
    ("decoder.layers.{0-3}.**", "decoder.layers.13.mlp.linear_fc2", False),
    ("decoder.layers.{1,5}.**.linear_qkv", "decoder.layers.5.self_attention.linear_qkv", True),
    ("**.mlp.*", "decoder.layers.0.mlp.linear_fc1", True),
    ("**.mlp.*", "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1", False),
])
def test_pattern_matching(pattern, path, hit):
    assert pattern_matches(pattern, path) is hit


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test reads type and message
        return f"{type(exc).__name__}: {exc}"
    return None


def _body():
    import torch
    import megatron_mole as mm
    from megatron_mole.layers.base import AdapterWrapper
    from megatron_mole.routing import Router
    from tests import _models

    mm.init_distributed(device="cpu", seed=1234)
    res = {}

    def build(moe=False):
        model, _ = _models.build_gpt(moe=moe)
        _models.seed_full_params(model, seed=3)
        return model

    def wrapped(model):
        return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterWrapper))

    def cfg(**kw):
        return mm.MoLEConfig(num_experts=2, rank=2, **kw)

    m = mm.apply_mole(build(), cfg(targets=ALL))
    res["mlp_scope"] = wrapped(m)
    res["trainable"] = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    res["frozen_base"] = all(not p.requires_grad for n, p in m.named_parameters() if ".base." in n)
    res["twice"] = _error(lambda: mm.apply_mole(m, cfg()))
    sd = mm.adapter_state_dict(m)
    res["sd_names"] = sorted(sd)
    bad = dict(sd)
    bad.pop("decoder.layers.0.mlp.mole.router.weight")
    bad["decoder.layers.9.mlp.mole.router.weight"] = torch.zeros(2, 64)
    bad["decoder.layers.1.mlp.linear_fc1.mole.lora_a"] = torch.zeros(2, 3, 64)
    res["load_errors"] = _error(lambda: mm.load_adapter_state_dict(m, bad))

    m = mm.apply_mole(build(), cfg(targets=["decoder.layers.{1}.**"], expert_scope="linear"))
    res["layer_pattern_linear_scope"] = wrapped(m)
    m = mm.apply_mole(build(), cfg(targets=["linear_qkv", "linear_fc2"], layers=[0]))
    res["layers_field"] = wrapped(m)
    res["no_match"] = _error(lambda: mm.apply_mole(build(), cfg(targets=["linear_qkv", "linear_fc9"])))
    res["no_match_layers"] = _error(lambda: mm.apply_mole(build(), cfg(targets=ALL, layers=[7])))
    res["whole_mlp"] = _error(lambda: mm.apply_mole(build(), cfg(targets=["decoder.layers.0.mlp"])))
    res["perft_dense"] = _error(lambda: mm.apply_mole(build(), cfg(targets=ALL, method="perft-r")))

    # MoE base: attention adapters work; routed-expert linears are out of scope
    moe = mm.apply_mole(build(moe=True), cfg(targets=["linear_qkv", "linear_proj"]))
    res["moe_attention"] = wrapped(moe)
    tokens = _models.make_batches(1, 2)[0]
    pos = torch.arange(tokens.shape[1] - 1).unsqueeze(0).expand(2, -1)
    moe(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).mean().backward()
    res["moe_grads"] = all(p.grad is not None for p in moe.parameters() if p.requires_grad)
    res["moe_bare_fc1"] = _error(lambda: mm.apply_mole(build(moe=True), cfg(targets=["linear_fc1"])))
    res["moe_explicit"] = _error(lambda: mm.apply_mole(
        build(moe=True), cfg(targets=["decoder.layers.0.mlp.experts.**"])))

    # A MoLE model cast to bf16 after apply_mole (model.to(bf16), as Megatron's Float16Module does):
    # the forward works and the routers still compute fp32 logits, from the bf16-rounded weight.
    m = mm.apply_mole(build(), cfg(targets=ALL))
    m.to(torch.bfloat16)
    seen = []
    for name, module in m.named_modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda mod, args, out: seen.append(
                (mod.weight.dtype, args[0].detach(), mod.weight.detach(), out.logits_TE.detach())))
    out = m(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    out.float().mean().backward()
    res["bf16_cast"] = {
        "loss_finite": bool(torch.isfinite(out.float()).all()),
        "weight_dtypes": sorted({str(d) for d, *_ in seen}),
        "logit_dtypes": sorted({str(r[3].dtype) for r in seen}),
        # reference in float64 from the bf16 weight: only fp32 rounding separates them
        "max_err": max(float((lg.double() - x.double() @ w.double().t()).abs().max()) for _, x, w, lg in seen),
        "num_routers": len(seen),
        "router_grads": all(p.grad is not None and torch.isfinite(p.grad.float()).all()
                            for n, p in m.named_parameters() if n.endswith("router.weight")),
    }

    # `megatron-mole bench layer` runs end to end (tiny sizes; timings not checked)
    import argparse
    from tools import bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["layer", "--hidden", "32", "--ffn", "48", "--tokens", "24",
                              "--experts", "3", "--ranks", "4", "--rounds", "1", "--device", "cpu"])
    res["bench"] = bench.run(args)
    return res


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, 1, timeout=300)[0]


def test_bf16_cast_after_apply_mole_keeps_fp32_routing(results):
    r = results["bf16_cast"]
    assert r["num_routers"] >= 2 and r["loss_finite"] and r["router_grads"]
    assert r["weight_dtypes"] == ["torch.bfloat16"] and r["logit_dtypes"] == ["torch.float32"]
    assert r["max_err"] < 1e-5, r["max_err"]


def test_mlp_scope_wraps_mlps_and_attention_linears(results):
    assert results["mlp_scope"] == [f"decoder.layers.{i}.{m}" for i in (0, 1) for m in
                                    ("mlp", "self_attention.linear_proj", "self_attention.linear_qkv")]
    assert results["frozen_base"]
    assert all(".base." not in n for n in results["trainable"])
    assert "decoder.layers.0.mlp.router.weight" in results["trainable"]


def test_adapter_tensor_names(results):
    names = results["sd_names"]
    for i in (0, 1):
        for suffix in ("mlp.mole.router.weight", "mlp.mole.router.balance_fraction", "mlp.linear_fc1.mole.lora_a",
                       "mlp.linear_fc1.mole.lora_b", "mlp.linear_fc2.mole.lora_a",
                       "mlp.linear_fc2.mole.lora_b", "self_attention.linear_qkv.lora.lora_a",
                       "self_attention.linear_qkv.lora.lora_b",
                       "self_attention.linear_proj.lora.lora_a",
                       "self_attention.linear_proj.lora.lora_b"):
            assert f"decoder.layers.{i}.{suffix}" in names
    assert len(names) == 20  # with the routers' balance state (balance="global", the default)


def test_selections(results):
    assert results["layer_pattern_linear_scope"] == [
        "decoder.layers.1.mlp.linear_fc1", "decoder.layers.1.mlp.linear_fc2",
        "decoder.layers.1.self_attention.linear_proj", "decoder.layers.1.self_attention.linear_qkv"]
    assert results["layers_field"] == ["decoder.layers.0.mlp", "decoder.layers.0.self_attention.linear_qkv"]


def test_errors_name_the_problem(results):
    assert "already has adapters" in results["twice"]
    assert "['linear_fc9']" in results["no_match"] and "MoLEConfig.targets" in results["no_match"]
    assert "layers [7]" in results["no_match_layers"]
    assert "name its linears" in results["whole_mlp"]
    assert "MoLEConfig.method='perft-r'" in results["perft_dense"] and "no MoE layers" in results["perft_dense"]
    err = results["load_errors"]
    assert "missing tensor 'decoder.layers.0.mlp.mole.router.weight'" in err
    assert "unexpected tensor 'decoder.layers.9.mlp.mole.router.weight'" in err
    assert "'decoder.layers.1.mlp.linear_fc1.mole.lora_a' has shape [2, 3, 64], expected [2, 2, 64]" in err


def test_bench_layer_runs(results):
    assert results["bench"] == 0


def test_moe_base(results):
    assert results["moe_attention"] == [f"decoder.layers.{i}.self_attention.{m}" for i in (0, 1)
                                        for m in ("linear_proj", "linear_qkv")]
    assert results["moe_grads"]
    assert "['linear_fc1']" in results["moe_bare_fc1"]
    assert "inside an MoE routed expert" in results["moe_explicit"]
