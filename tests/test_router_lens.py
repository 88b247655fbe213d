"""Router Lens on a tiny converted Mixtral, the three steps in one process:

1. ``trainable: routers``: 2 steps change the MoE routers' weights and nothing else (every
   other base tensor bit-identical to a fresh load); the checkpoint holds the tuned routers;
2. ``analyze --select 2`` on that checkpoint runs the tuned routers (they route differently
   from the base's) and writes the selection;
3. CEFT (``trainable_experts``: the selection) from the ORIGINAL base: exactly the selected
   experts' fc1/fc2 get a LoRA (saved, and trained: B leaves zero); routers and every base
   tensor, the selected experts' own weights included, stay bit-identical.
"""
import json
from argparse import Namespace
from pathlib import Path

from tests._dist import run_distributed


def _config(root, work, save, **extra):
    from megatron_mole.training.train_config import config_from_dict

    return config_from_dict({
        "base": {"checkpoint": str(root / "mixtral_mcore"), "tokenizer": str(work / "hf_base")},
        "parallel": {"micro_batch": 4, "global_batch": 4}, "optimizer": {"lr": 0.05},
        "schedule": {"max_steps": 2}, "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 48},
        "logging": {"progress": False}, "checkpoint": {"save_dir": str(save)}, **extra})


def _base_tensors(model):
    return {name.replace(".base.", "."): p.detach().clone() for name, p in model.named_parameters()
            if "lora_" not in name and ".mole." not in name}


def _steps(root, work):
    import torch

    from megatron_mole.checkpoint import ckpt_io, load_model
    from megatron_mole.training.analyze import analyze
    from megatron_mole.training.loop import Trainer

    root, work = Path(root), Path(work)
    out = {}
    # 1. router tuning
    trainer = Trainer(_config(root, work, root / "rt", trainable="routers"))
    trainer.run()
    fresh = _base_tensors(load_model(str(root / "mixtral_mcore")))
    tuned = _base_tensors(trainer.model[0].module)
    assert sorted(tuned) == sorted(fresh)
    out["changed"] = sorted(n for n in fresh if not torch.equal(fresh[n], tuned[n]))
    shared = ckpt_io.load_checkpoint(root / "rt").shared
    out["saved_routers"] = sorted(shared["base_routers"])
    out["saved_equal"] = all(torch.equal(shared["base_routers"][n], tuned[n]) for n in out["saved_routers"])
    out["saved_adapters"] = len(shared["adapters"])
    # 2. selection on the tuned routers, and on the base for comparison
    args = dict(data=[str(work / "data" / "train.jsonl")], base=None, tokenizer=str(work / "hf_base"), step=None,
                tp=1, pp=1, ep=1, max_examples=8, seq_length=48, micro_batch=4, select=2)
    out["tuned_report"] = analyze(Namespace(checkpoint=str(root / "rt"), out=str(root / "lens"), **args))
    out["base_report"] = analyze(Namespace(checkpoint=str(root / "mixtral_mcore"), out=str(root / "plain"), **args))
    selection = json.loads((root / "lens" / "selection.json").read_text())
    out["selection"] = {r["layer"]: r["experts"] for r in selection["routers"].values()}
    # 3. CEFT from the original base
    trainer = Trainer(_config(root, work, root / "ceft", mole={"rank": 4, "alpha": 16},
                              trainable_experts=str(root / "lens" / "selection.json")))
    trainer.run()
    after = _base_tensors(trainer.model[0].module)
    out["ceft_changed"] = sorted(n for n in fresh if not torch.equal(fresh[n], after[n]))
    out["ceft_names"] = sorted(after) == sorted(fresh)
    adapters = ckpt_io.load_checkpoint(root / "ceft").shared["adapters"]
    out["ceft_adapters"] = sorted(adapters)
    out["ceft_b_trained"] = all(adapters[n].abs().sum() > 0 for n in adapters if n.endswith("lora_b"))
    return out


def test_router_tuning_selection_and_ceft(tiny_moe_base, tiny_train_base):
    out = run_distributed(_steps, 1, str(tiny_moe_base), str(tiny_train_base), timeout=600)[0]
    routers = [f"decoder.layers.{i}.mlp.router.weight" for i in range(2)]
    assert out["changed"] == routers  # the routers trained, nothing else moved
    assert out["saved_routers"] == routers and out["saved_equal"] and out["saved_adapters"] == 0

    tuned, base = out["tuned_report"], out["base_report"]
    assert tuned["source"] == "tuned routers" and base["source"] == "base"
    assert any(tuned["routers"][n]["uses"] != base["routers"][n]["uses"] for n in tuned["routers"])
    for name, r in tuned["routers"].items():  # the selection ranks the tuned routers' counts
        totals = [sum(col) for col in zip(*r["uses"].values())]
        assert out["selection"][r["layer"]] == sorted(range(4), key=lambda e: (-totals[e], e))[:2]

    assert out["ceft_changed"] == [] and out["ceft_names"]  # routers and every expert weight bit-identical
    expected = sorted(f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}.lora.lora_{ab}"
                      for layer, experts in out["selection"].items() for e in experts
                      for linear in ("linear_fc1", "linear_fc2") for ab in "ab")
    assert out["ceft_adapters"] == expected and out["ceft_b_trained"]
