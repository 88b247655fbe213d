"""`megatron-mole analyze` against independent references, one 2-process launch.

- The frozen routers of a converted tiny Mixtral (4 experts, top-2) at TP2 (Megatron's MoE
  router then sees sequence-parallel chunks) and EP2 (two data-parallel ranks share the
  examples): every (domain, expert) use count equals the one from transformers' own Mixtral
  routers (their chosen indices) on the same tokens.
- MoLE routers of a saved adapter (random router, zero B: the base's hidden states are
  unchanged) on the tiny Llama at PP2 (Megatron's pipeline schedule): the counts equal top-1 of
  ``W x`` with x the transformers Llama's post-attention-norm output, and ``--select`` ranks by
  those counts.
"""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests._dist import run_distributed

EXAMPLES, SEQ = 5, 64
LAYOUTS = {"tp2": dict(tp=2, pp=1, ep=1), "ep2": dict(tp=1, pp=1, ep=2)}  # the MoE base
MOLE_LAYOUT = dict(tp=1, pp=2, ep=1)


@pytest.fixture(scope="module")
def bases(tiny_moe_base, tiny_train_base):
    return tiny_moe_base, tiny_train_base


def _args(checkpoint, data, out, layout, **extra):
    values = dict(checkpoint=str(checkpoint), data=[str(data)], out=str(out), base=None, tokenizer=None,
                  step=None, max_examples=EXAMPLES, seq_length=SEQ, micro_batch=2, select=None, **layout)
    values.update(extra)
    return Namespace(**values)


def _uses(out):
    report = json.loads((Path(out) / "expert_usage.json").read_text())
    return {name: r["uses"] for name, r in report["routers"].items()}, report


def _ranks(root, work):
    import torch.distributed as dist

    import megatron_mole as mm
    from megatron_mole.checkpoint import load_model
    from megatron_mole.checkpoint.adapters import save_adapter
    from megatron_mole.training.analyze import analyze

    root, work = Path(root), Path(work)
    data = work / "data" / "train.jsonl"
    results = {}
    for name, layout in LAYOUTS.items():
        analyze(_args(root / "mixtral_mcore", data, root / name, layout))
        dist.barrier()
        results[name] = _uses(root / name)[0] if dist.get_rank() == 0 else None
    # a MoLE adapter with random routers; B = 0 keeps the base's hidden states
    mm.runtime.set_model_parallel(tp=1, pp=1, ep=1)
    cfg = mm.MoLEConfig(num_experts=4, rank=4, alpha=8, top_k=1, seed=7,
                        targets=["linear_fc1", "linear_fc2", "linear_qkv"])
    sd = mm.adapter_state_dict(mm.apply_mole(load_model(str(work / "mcore")), cfg))
    if dist.get_rank() == 0:
        save_adapter(str(root / "adapter"), sd, cfg, {"checkpoint": str(work / "mcore")}, overwrite=True)
    dist.barrier()
    analyze(_args(root / "adapter", data, root / "mole", MOLE_LAYOUT, tokenizer=str(work / "hf_base"),
                  select=2))
    if dist.get_rank() == 0:
        results["mole"] = _uses(root / "mole")
        results["selection"] = json.loads((root / "mole" / "selection.json").read_text())
        results["router_weights"] = {k: v for k, v in sd.items() if k.endswith("router.weight")}
    return results


def _dataset(tokenizer_dir, data):
    from transformers import AutoTokenizer

    from megatron_mole.training.data import InstructionDataset

    return InstructionDataset.from_jsonl([str(data)], AutoTokenizer.from_pretrained(tokenizer_dir), SEQ)


def _reference_counts(dataset, route, num_layers, num_experts):
    """{layer: [domain][expert] uses} from ``route(ids_1S) -> [layer] -> chosen experts [S, k]``."""
    counts = {layer: [[0] * num_experts for _ in dataset.domains] for layer in range(num_layers)}
    for d, group in enumerate(dataset.examples):
        for example in group[:EXAMPLES]:
            ids = torch.as_tensor(example.ids_L[:SEQ]).view(1, -1)
            for layer, chosen_SK in enumerate(route(ids)):
                for e in chosen_SK.reshape(-1).tolist():
                    counts[layer][d][e] += 1
    return counts


def test_analyze_matches_transformers_routers(bases):
    from transformers import AutoModelForCausalLM

    root, work = bases
    results = run_distributed(_ranks, 2, str(root), str(work), timeout=600)[0]
    data = work / "data" / "train.jsonl"

    # Mixtral: transformers' routers' own choices
    dataset = _dataset(root / "hf_mixtral", data)
    mixtral = AutoModelForCausalLM.from_pretrained(root / "hf_mixtral").eval()
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
             for layer in mixtral.model.layers]

    def route_mixtral(ids):
        seen.clear()
        with torch.no_grad():
            mixtral(input_ids=ids)
        return list(seen)

    expected = _reference_counts(dataset, route_mixtral, 2, 4)
    for h in hooks:
        h.remove()
    for name in LAYOUTS:
        got = results[name]
        assert sorted(got) == ["decoder.layers.0.mlp.router", "decoder.layers.1.mlp.router"], name
        for layer in range(2):
            by_domain = got[f"decoder.layers.{layer}.mlp.router"]
            assert [by_domain[d] for d in dataset.domains] == expected[layer], (name, layer)

    # MoLE: top-1 of the adapter router on the HF Llama's post-attention-norm output
    dataset = _dataset(work / "hf_base", data)
    llama = AutoModelForCausalLM.from_pretrained(work / "hf_base").eval()
    weights = results["router_weights"]
    normed = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: normed.append(out[0]))
             for layer in llama.model.layers]

    def route_mole(ids):
        normed.clear()
        with torch.no_grad():
            llama(input_ids=ids)
        return [(x @ weights[f"decoder.layers.{i}.mlp.mole.router.weight"].T).argmax(-1) for i, x in enumerate(normed)]

    expected = _reference_counts(dataset, route_mole, 2, 4)
    for h in hooks:
        h.remove()
    uses, report = results["mole"]
    assert report["source"] == "adapter" and report["layout"]["pp"] == 2
    for layer in range(2):
        name = f"decoder.layers.{layer}.mlp.mole.router"
        assert [uses[name][d] for d in dataset.domains] == expected[layer], layer
        assert report["routers"][name]["experts_per_token"]["all"] == 1.0
        totals = [sum(col) for col in zip(*expected[layer])]
        ranked = sorted(range(4), key=lambda e: (-totals[e], e))[:2]
        assert results["selection"]["routers"][name]["experts"] == ranked
    for png in ("expert_load.png", "routing_entropy.png"):
        assert (root / "mole" / png).stat().st_size > 1000
