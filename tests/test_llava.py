"""LLaVA bases: Megatron-core's LLaVAModel on the CPU runtime, and conversion from/to transformers.

One 2-process launch: a tiny transformers LLaVA (CLIP tower whose last layer LLaVA skips,
Llama or Qwen2 LM) is converted by both processes and written back (files byte for byte
equal); the converted model's image+text logits match transformers' at TP1, TP2 and PP2
(float64 1e-10); and two SGD steps of the whole model (vision tower,
projector, LM) give the same losses at TP1xDP2, TP2 and PP2 (1e-5), which checks the
backward pass through Megatron's schedules as well. The same holds with MoLE on the LM
(top-k/MLP scope and DynMoLE/linear scope), the projector trainable and Parrot inserted
(full and LoRA experts, stage 2); the trained adapter, exported, runs in transformers'
LlavaForConditionalGeneration with logits within 1e-4 of Megatron's; stage 1 moves the
projector only.
"""
import filecmp
import os

import pytest

from tests._dist import run_distributed

LAYOUTS = [dict(tp=1, pp=1), dict(tp=2, pp=1), dict(tp=1, pp=2)]
STEPS = 2


def _run(hf_dirs, work):
    import torch
    import torch.distributed as dist

    import megatron_mole as mm
    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_mole.checkpoint.llava_run import compare_llava_logits
    from megatron_mole.checkpoint.mcore import load_model, read_spec
    from megatron_mole.runtime import set_model_parallel
    from tests import _llava

    import time

    t0 = time.time()
    info = mm.init_distributed(device="cpu")
    out = {"roundtrip": {}, "verify": [], "losses": [], "times": []}
    for name, hf in hf_dirs.items():
        mc, back = os.path.join(work, name + "-mc"), os.path.join(work, name + "-back")
        hf_to_mcore(hf, mc, tp=2)
        mcore_to_hf(mc, back)
        if info.rank == 0:
            out["roundtrip"][name] = sorted(
                f for f in os.listdir(hf) if not filecmp.cmp(os.path.join(hf, f), os.path.join(back, f), shallow=False))
    out["times"].append(time.time() - t0)
    checks = [("llama", 2, 1, "float64"), ("llama", 1, 2, "float64"), ("qwen2", 1, 1, "float64")]
    for name, tp, pp, dtype in checks:
        result = compare_llava_logits(hf_dirs[name], os.path.join(work, name + "-mc"), tp=tp, pp=pp, dtype=dtype,
                                      device="cpu")
        out["verify"].append((name, tp, pp, dtype, result))
    out["times"].append(time.time() - t0)
    mc = os.path.join(work, "llama-mc")
    spec = read_spec(mc)
    # one global batch repeated: the loss must fall, which shows the updates land
    batches = _llava.llava_batches(spec, 1, global_batch=2) * STEPS
    for layout in LAYOUTS:
        set_model_parallel(**layout)
        # PP pads every sequence to the LM's max length: keep it at the combined length
        model = load_model(mc, params_dtype=torch.float32)
        out["losses"].append(_llava.train_llava(model, batches, lr=0.1))
    out["times"].append(time.time() - t0)
    out["mole"] = _mole_parrot(mc, hf_dirs["llama"], spec, batches, work)
    out["times"].append(time.time() - t0)
    dist.barrier()
    return out


# MoLE on the LM (both scopes, two routers) + trainable projector + Parrot (full / LoRA experts)
MOLE_CASES = [
    dict(mole=dict(router="topk", expert_scope="mlp", targets=["linear_fc1", "linear_fc2"]), lora_rank=None),
    dict(mole=dict(router="dynmole", expert_scope="linear", targets=["linear_qkv", "linear_fc2"]), lora_rank=4),
]


def _mole_parrot(mc, hf, spec, batches, work):
    import torch

    import megatron_mole as mm
    from megatron_mole.checkpoint.llava_adapter import export_llava_adapter
    from megatron_mole.checkpoint.llava_run import compare_llava_logits
    from megatron_mole.checkpoint.mcore import load_model
    from megatron_mole.layers.parrot import apply_parrot, parrot_module, set_parrot_stage
    from megatron_mole.model import set_projector_trainable, update_global_balance
    from megatron_mole.runtime import set_model_parallel
    from tests import _llava

    results = []
    for index, case in enumerate(MOLE_CASES):
        losses = []
        for layout in LAYOUTS:
            set_model_parallel(**layout)
            model = load_model(mc, params_dtype=torch.float32)
            mm.apply_mole(model, mm.MoLEConfig(num_experts=4, rank=4, alpha=8, lora_b_init="random", seed=11,
                                               **case["mole"]))
            set_projector_trainable(model)
            apply_parrot(model, num_experts=3, ffn_hidden_size=32, lora_rank=case["lora_rank"], seed=5)
            set_parrot_stage(model, 2)
            losses.append(_llava.train_llava(model, batches, lr=0.1, after_step=update_global_balance))
        # the last layout (PP2) exports; transformers runs it against Megatron at TP2
        adapter = os.path.join(work, f"adapter-{index}")
        export_llava_adapter(model, spec, adapter)
        verify = compare_llava_logits(hf, mc, tp=2, pp=1, dtype="float32", device="cpu", adapter=adapter)
        results.append(dict(losses=losses, verify=verify))
    # stage 1: the projector alone learns; Parrot is bypassed, the adapters stay put
    set_model_parallel(tp=2, pp=1)
    model = load_model(mc, params_dtype=torch.float32)
    mm.apply_mole(model, mm.MoLEConfig(num_experts=2, rank=4, alpha=8, lora_b_init="random", seed=11))
    apply_parrot(model, num_experts=3, ffn_hidden_size=32, seed=5)
    set_parrot_stage(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _llava.train_llava(model, batches[:1], lr=0.2)
    moved = sorted({n.split(".")[0] + ("/moe" if ".moe." in n else "") for n, p in model.named_parameters()
                    if not torch.equal(before[n], p.detach())})
    results.append(dict(stage1_moved=moved, parrot_enabled=parrot_module(model).enabled))
    return results


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    from tests._llava import save_tiny_llava

    root = tmp_path_factory.mktemp("llava")
    hf_dirs = {lm: save_tiny_llava(str(root / lm), lm=lm, seed=i) for i, lm in enumerate(("llama", "qwen2"))}
    return run_distributed(_run, 2, hf_dirs, str(root), timeout=600)


def test_round_trip_bit_exact(llava_run):
    assert llava_run[0]["roundtrip"] == {"llama": [], "qwen2": []}


def test_logits_match_transformers_at_tp_pp(llava_run):
    for name, tp, pp, dtype, result in llava_run[0]["verify"]:
        print(name, tp, pp, dtype, result["max_rel"])
        assert result["ok"], (name, tp, pp, dtype, result)
        assert result["scale"] > 0.1


def test_training_parity_tp_pp(llava_run):
    losses = llava_run[0]["losses"]
    print("times", llava_run[0]["times"])
    print({str(layout): loss for layout, loss in zip(LAYOUTS, losses)})
    reference = losses[0]
    assert reference[-1] < reference[0], reference
    for layout, got in zip(LAYOUTS[1:], losses[1:]):
        for step, (ref, value) in enumerate(zip(reference, got)):
            assert abs(value - ref) <= 1e-5 * abs(ref), (layout, step, ref, value)
    assert llava_run[1]["losses"] == losses


def test_mole_parrot_parity_and_export(llava_run):
    *cases, stage1 = llava_run[0]["mole"]
    for case, result in zip(MOLE_CASES, cases):
        reference = result["losses"][0]
        print(case, result["losses"], result["verify"]["max_rel"])
        assert reference[-1] < reference[0], reference
        for layout, got in zip(LAYOUTS[1:], result["losses"][1:]):
            for ref, value in zip(reference, got):
                assert abs(value - ref) <= 1e-5 * abs(ref), (case, layout, reference, got)
        assert result["verify"]["ok"], result["verify"]
    # stage 1 trains the projector only (vision tower, LM, adapters and Parrot fixed)
    assert stage1["stage1_moved"] == ["vision_projection"], stage1
    assert stage1["parrot_enabled"] is False
