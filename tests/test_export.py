"""Adapter export: Megatron + adapter against transformers + exported adapter, PEFT, merge.

References are independent of the export code: Megatron's own GPTModel with
``apply_mole`` (the trained model), transformers' own models, PEFT's own
``PeftModel.from_pretrained``. Tiny bases (hidden 64, 2 layers) are built and converted
locally (tests/test_convert.py's ``make_hf_model``); adapters have random (non-zero) B
so that they change the logits.

One spawned process builds everything and checks TP1; one 2-process launch runs
``verify --adapter`` at TP2, PP2 and (MoE base) EP2. Hugging Face-side checks run in the pytest process.

HybridModel (megatron-core >= 0.19): for the HYBRID_CASES the adapter made on the GPTModel
loads into ``load_model(..., model="hybrid")`` of the same checkpoint with the same logits,
its state dict comes back under the same names, that loads into a GPTModel again (same
logits), and ``verify --model hybrid`` matches transformers with the exported adapter.
"""
import argparse
import dataclasses
import json
import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_convert import make_hf_model

TOLERANCE = 1e-4
ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
# name -> (base case of tests/test_convert.py, MoLEConfig fields)
CASES = {
    "mlp_top1": ("llama", dict(expert_scope="mlp", top_k=1, targets=ALL)),
    "mlp_top2": ("llama", dict(expert_scope="mlp", top_k=2, targets=ALL)),
    "linear_top1": ("llama", dict(expert_scope="linear", top_k=1, targets=ALL)),
    "linear_top2": ("llama", dict(expert_scope="linear", top_k=2, targets=ALL)),
    # biases on q/k/v, a tied and padded vocabulary; fc2 alone adapted in the MLP scope
    "qwen2_mlp_top2_fc2": ("qwen2_bias_tied_padded", dict(expert_scope="mlp", top_k=2,
                                                          targets=["linear_qkv", "linear_fc2"])),
    # an MoE base: routed attention LoRA (MoE experts are not "mole" targets)
    "mixtral_attention": ("mixtral", dict(expert_scope="linear", top_k=1, targets=["linear_qkv", "linear_proj"])),
    # Qwen2-MoE: routed LoRA on attention and on the shared expert (fused fc1 -> gate/up_proj)
    "qwen2_moe_linear": ("qwen2_moe_sharded", dict(expert_scope="linear", top_k=2, targets=ALL)),
    # plain LoRA: one expert in the MLP scope (routers of one expert), and attention only
    "one_expert": ("llama", dict(expert_scope="mlp", num_experts=1, top_k=1, targets=ALL)),
    "attention_lora": ("llama", dict(expert_scope="mlp", targets=["linear_qkv", "linear_proj"], layers=[1])),
}
PLAIN_LORA = ("one_expert", "attention_lora")
HYBRID_CASES = ("mlp_top2", "qwen2_mlp_top2_fc2", "qwen2_moe_linear")
# (case, tp, pp, ep) for the 2-process launch (plus linear_top2 at TP2 through the CLI)
MULTI_LAYOUT = [("mlp_top1", 2, 1, 1), ("mlp_top2", 1, 2, 1), ("linear_top1", 1, 2, 1),
                ("qwen2_moe_linear", 1, 1, 2), ("mixtral_attention", 1, 2, 1)]


def _cfg(fields):
    import megatron_mole as mm

    values = dict(num_experts=4, rank=4, alpha=8, lora_b_init="random", seed=7, dropout=0.1)
    values.update(fields)
    return mm.MoLEConfig(**values)


def _cli(*argv):
    from megatron_mole.checkpoint import export_cli

    parser = argparse.ArgumentParser()
    export_cli.add_arguments(parser)
    return export_cli.run(parser.parse_args(list(argv)))


def tokens():
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))


def _save_training_checkpoint(root, sd, cfg, mcore):
    """What the training loop saves (ckpt_io.training_payloads), without a training run."""
    from megatron_mole.checkpoint import ckpt_io

    shared, rank_payload = ckpt_io.training_payloads(
        step=3, adapters=sd, optimizer_state={}, scheduler_state={}, sampler_state={},
        base={"checkpoint": mcore}, layout={"tp": 1}, config=None)
    shared["mole_config"] = cfg.to_dict()
    ckpt_io.save_checkpoint(root, 3, rank_payload, shared_payload=shared)


def _build(root):
    import megatron_mole as mm
    from megatron_mole.checkpoint import adapters, verify
    from megatron_mole.checkpoint.convert import hf_to_mcore
    from megatron_mole.checkpoint.mcore import load_model

    out = {}
    for base in sorted({b for b, _ in CASES.values()}):
        make_hf_model(base, f"{root}/{base}/hf")
        hf_to_mcore(f"{root}/{base}/hf", f"{root}/{base}/mcore")
    for case, (base, fields) in CASES.items():
        hf, mcore, work = f"{root}/{base}/hf", f"{root}/{base}/mcore", f"{root}/{case}"
        cfg = _cfg(fields)
        model = mm.apply_mole(load_model(mcore, params_dtype=torch.float32), cfg)
        sd = mm.adapter_state_dict(model)
        vocab = json.load(open(f"{mcore}/mcore_config.json"))["shapes"]["hf_vocab_size"]
        # plain lists: tensors would cross the process boundary as shared memory that dies with the child
        res = {"logits": verify.megatron_logits([model], tokens(), vocab).tolist()}
        if case == "mlp_top1":  # from a training checkpoint (the root: `latest` picks the step)
            _save_training_checkpoint(f"{work}/ckpt", sd, cfg, mcore)
            res["status"] = _cli("--checkpoint", f"{work}/ckpt", "--out", f"{work}/adapter")
        else:
            adapters.save_adapter(f"{work}/saved", sd, cfg, {"checkpoint": mcore})
            res["status"] = _cli("--checkpoint", f"{work}/saved", "--out", f"{work}/adapter")
        back = adapters.import_adapter(f"{work}/adapter")[0]
        res["round_trip"] = sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        res["tensors"] = len(sd)
        res["diff"] = verify.max_logits_difference(hf, mcore, adapter=f"{work}/adapter", seq=16)
        if case in HYBRID_CASES:
            res["hybrid"] = _hybrid_checks(hf, mcore, work, cfg, sd, res["logits"], vocab)
        if case in PLAIN_LORA:
            res["peft_status"] = _cli("--checkpoint", f"{work}/saved", "--out", f"{work}/peft", "--format", "peft")
            res["merge_status"] = _cli("--checkpoint", f"{work}/saved", "--out", f"{work}/merged", "--merge")
        out[case] = res
    # error paths of the CLI: exit status 2, one line, nothing left behind
    saved = f"{root}/mlp_top2/saved"
    out["errors"] = {
        "exists": _cli("--checkpoint", saved, "--out", f"{root}/mlp_top2/adapter"),
        "peft_of_routed": _cli("--checkpoint", saved, "--out", f"{root}/x_peft", "--format", "peft"),
        "merge_of_routed": _cli("--checkpoint", saved, "--out", f"{root}/x_merged", "--merge"),
        "no_checkpoint": _cli("--checkpoint", f"{root}/nowhere", "--out", f"{root}/x_none"),
        "wrong_base": _cli("--checkpoint", saved, "--base", f"{root}/mixtral/mcore", "--out", f"{root}/x_base"),
    }
    out["overwrite"] = _cli("--checkpoint", saved, "--out", f"{root}/mlp_top2/adapter", "--overwrite")
    return out


def _hybrid_checks(hf, mcore, work, cfg, sd, gpt_logits, vocab):
    """GPT adapter -> HybridModel of the same checkpoint -> GPTModel: logits at each hop."""
    import megatron_mole as mm
    from megatron_mole.checkpoint import verify
    from megatron_mole.checkpoint.mcore import load_model
    from megatron_mole.runtime import compat

    if compat.hybrid_unavailable_reason() is not None:
        return None
    gpt_logits = torch.tensor(gpt_logits)
    other = dataclasses.replace(cfg, seed=cfg.seed + 1)  # the loads must overwrite this init
    hybrid = mm.apply_mole(load_model(mcore, params_dtype=torch.float32, model="hybrid"), other)
    mm.load_adapter_state_dict(hybrid, sd)
    into_hybrid = verify.megatron_logits([hybrid], tokens(), vocab)
    hsd = mm.adapter_state_dict(hybrid)
    gpt = mm.apply_mole(load_model(mcore, params_dtype=torch.float32), other)
    mm.load_adapter_state_dict(gpt, hsd)
    back = verify.megatron_logits([gpt], tokens(), vocab)
    return {
        "into_hybrid": float((into_hybrid - gpt_logits).abs().max()),
        "back_to_gpt": float((back - gpt_logits).abs().max()),
        "scale": float(gpt_logits.abs().max()),
        "same_tensors": sorted(hsd) == sorted(sd) and all(torch.equal(hsd[k], sd[k]) for k in sd),
        "hf_diff": verify.max_logits_difference(hf, mcore, adapter=f"{work}/adapter", seq=16, model="hybrid"),
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("export"))
    (out,) = run_distributed(_build, 1, root, timeout=600)
    return root, out


@pytest.mark.parametrize("case", list(CASES))
def test_export_round_trips_and_matches_megatron(built, case):
    _, out = built
    res = out[case]
    assert res["status"] == 0
    assert res["round_trip"] and res["tensors"] > 0  # export -> inverse mapping -> bit-identical tensors
    assert res["diff"] <= TOLERANCE, (case, res["diff"])


@pytest.mark.parametrize("case", HYBRID_CASES)
def test_gpt_adapter_loads_into_hybrid_model_and_back(built, case):
    from megatron_mole.runtime import compat

    reason = compat.hybrid_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    res = built[1][case]["hybrid"]
    assert res["same_tensors"]
    assert res["into_hybrid"] <= 1e-5 and res["back_to_gpt"] <= 1e-5, res
    assert res["hf_diff"] <= TOLERANCE, res


def _hf(root, case, adapter=None):
    from transformers import AutoModelForCausalLM

    from megatron_mole.hf import load_mole_adapter

    model = AutoModelForCausalLM.from_pretrained(f"{root}/{CASES[case][0]}/hf", dtype=torch.float32).eval()
    return load_mole_adapter(model, adapter) if adapter else model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=tokens()).logits


@pytest.mark.parametrize("case", ["mlp_top2", "linear_top1", "one_expert"])
def test_adapter_changes_the_logits_and_matches_megatron(built, case):
    root, out = built
    adapted = _logits(_hf(root, case, f"{root}/{case}/adapter"))
    assert (adapted - _logits(_hf(root, case))).abs().max() > 1e-2  # B is not zero: the adapter matters
    assert (adapted - torch.tensor(out[case]["logits"])).abs().max() <= TOLERANCE


def test_adapter_files(built):
    root, _ = built
    with open(f"{root}/mlp_top2/adapter/adapter_config.json") as f:
        config = json.load(f)
    assert (config["method"], config["router"], config["num_experts"], config["top_k"], config["rank"],
            config["alpha"], config["expert_scope"]) == ("mole", "topk", 4, 2, 4, 8, "mlp")
    assert config["base"]["model_type"] == "llama" and config["layers"] == [0, 1]
    assert "model.layers.1.self_attn.k_proj" in config["target_modules"]
    assert "model.layers.0.mlp.gate_proj" in config["target_modules"]
    from safetensors import safe_open

    with safe_open(f"{root}/mlp_top2/adapter/adapter_model.safetensors", "pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    # hidden 64, 4 query heads and 2 KV heads of 16, ffn 96, rank 4, 4 experts
    assert shapes["model.layers.0.self_attn.q_proj.lora.lora_b"] == [64, 4]
    assert shapes["model.layers.0.self_attn.v_proj.lora.lora_b"] == [32, 4]
    assert shapes["model.layers.0.mlp.mole.router.weight"] == [4, 64]
    assert shapes["model.layers.0.mlp.up_proj.mole.lora_b"] == [4, 96, 4]
    assert shapes["model.layers.0.mlp.down_proj.mole.lora_a"] == [4, 4, 96]
    leftovers = [n for n in os.listdir(root) if n.startswith(".") or n.startswith("x_")]
    assert leftovers == []


def test_cli_errors(built):
    _, out = built
    assert out["errors"] == {k: 2 for k in out["errors"]}
    assert out["overwrite"] == 0


@pytest.mark.parametrize("case", PLAIN_LORA)
def test_peft_loads_the_one_expert_export(built, case):
    from peft import PeftModel

    root, out = built
    assert out[case]["peft_status"] == 0
    model = PeftModel.from_pretrained(_hf(root, case), f"{root}/{case}/peft").eval()
    assert (_logits(model) - torch.tensor(out[case]["logits"])).abs().max() <= TOLERANCE


@pytest.mark.parametrize("case", PLAIN_LORA)
def test_merged_export_equals_the_adapter(built, case):
    from transformers import AutoModelForCausalLM

    root, out = built
    assert out[case]["merge_status"] == 0
    merged = AutoModelForCausalLM.from_pretrained(f"{root}/{case}/merged", dtype=torch.float32).eval()
    unmerged = _logits(_hf(root, case, f"{root}/{case}/adapter"))
    assert (_logits(merged) - unmerged).abs().max() <= TOLERANCE
    assert os.path.exists(f"{root}/{case}/merged/config.json")


def test_generate_with_the_adapter(built):
    root, _ = built
    for case in ("mlp_top2", "linear_top2"):
        model = _hf(root, case, f"{root}/{case}/adapter")
        prompt = tokens()[:1, :5]
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            # the cached, token-by-token path scores the same continuation as one full forward
            full = model(input_ids=greedy[:, :-1]).logits[0, 4:].argmax(-1)
        assert greedy.shape == (1, 11)
        assert torch.equal(full, greedy[0, 5:])


def _layouts(root, layouts):
    from megatron_mole.checkpoint import verify

    out = {}
    for case, tp, pp, ep in layouts:
        base = CASES[case][0]
        out[(case, tp, pp, ep)] = verify.max_logits_difference(
            f"{root}/{base}/hf", f"{root}/{base}/mcore", tp=tp, pp=pp, ep=ep, seq=16,
            adapter=f"{root}/{case}/adapter")
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    out["cli"] = verify.run(parser.parse_args(["--hf", f"{root}/llama/hf", "--mcore", f"{root}/llama/mcore",
                                               "--adapter", f"{root}/linear_top2/adapter", "--tp", "2",
                                               "--seq", "8"]))
    return out


def test_verify_adapter_at_tp2_pp2_ep2(built):
    root, _ = built
    results = run_distributed(_layouts, 2, root, MULTI_LAYOUT, timeout=600)
    for key, value in results[0].items():
        if key == "cli":
            assert value == 0
        else:
            assert value <= TOLERANCE, (key, value)
    assert results[0] == results[1]
