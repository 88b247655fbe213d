"""PERFT adapters exported to transformers: Megatron and transformers logits agree.

Tiny Mixtral (4 experts, top-2, renormalised gates) and Qwen2-MoE (shared expert, gates
not renormalised, layer 1 a dense MLP: a mixed base, whose dense MLP gets MoLE) bases are
built and converted locally (tests/test_convert.py). One
2-process launch: for each PERFT variant an adapter with random B is applied to the
converted Megatron model, saved, exported with ``megatron-mole export`` and checked
with ``verify --adapter`` (Megatron with the re-imported adapter against transformers
with ``load_mole_adapter``, transformers 5.x fused expert tensors) at TP1 (Qwen2-MoE: R
and E, the variants that depend on the base's router) and at TP2 (all) and EP2 (R, E) for
Mixtral; the export re-imports bit-exactly. In the pytest
process: the adapter changes transformers' logits, and PEFT export is refused clearly.
"""
import copy
import os

import pytest
import torch

from tests._dist import run_distributed
from tests.test_export import _cli, tokens

TOLERANCE = 1e-4
# Qwen2-MoE with mlp_only_layers=[1]: layer 0's MoE block gets PERFT, layer 1's dense MLP MoLE
BASES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe_dense_layer"}
VARIANTS = {
    "perft-s": dict(num_experts=1),
    "perft-d": dict(num_experts=2),
    "perft-r": dict(num_experts=4, top_k=2),
    "perft-e": dict(),
}
# Qwen2-MoE (gates not renormalised, a shared expert): the variants that read the base's router
PER_BASE = {"mixtral": list(VARIANTS), "qwen2_moe": ["perft-r", "perft-e"]}
# (base, variant, tp, ep) checked at world size 2 beyond TP1: EP matters to the expert-sharded ones
LAYOUTS = [("mixtral", v, 2, 1) for v in VARIANTS] + [("mixtral", v, 1, 2) for v in ("perft-r", "perft-e")]


def _run(root):
    import torch.distributed as dist

    import megatron_mole as mm
    from megatron_mole.checkpoint import adapters, verify
    from megatron_mole.checkpoint.convert import hf_to_mcore
    from megatron_mole.checkpoint.mcore import load_model
    from megatron_mole.runtime import set_model_parallel
    from tests.test_convert import make_hf_model

    mm.init_distributed(device="cpu", seed=1234)
    for base, case in BASES.items():
        if dist.get_rank() == 0:
            make_hf_model(case, f"{root}/{base}/hf")
        dist.barrier()
        hf_to_mcore(f"{root}/{base}/hf", f"{root}/{base}/mcore")  # every process converts its share
    out = {"tp1": {}, "round_trip": {}, "layouts": {}}
    for base in BASES:
        mcore = f"{root}/{base}/mcore"
        for method in PER_BASE[base]:
            fields = VARIANTS[method]
            set_model_parallel(tp=1)
            cfg = mm.MoLEConfig(method=method, rank=4, alpha=8, lora_b_init="random", seed=7,
                                targets=["linear_qkv", "linear_fc1", "linear_fc2"], **fields)
            model = mm.apply_mole(load_model(mcore, params_dtype=torch.float32), cfg)
            sd = mm.adapter_state_dict(model)
            work = f"{root}/{base}/{method}"
            if dist.get_rank() == 0:
                adapters.save_adapter(f"{work}/saved", sd, cfg, {"checkpoint": mcore})
                status = _cli("--checkpoint", f"{work}/saved", "--out", f"{work}/adapter")
                back = adapters.import_adapter(f"{work}/adapter")[0]
                out["round_trip"][(base, method)] = (status == 0 and sorted(back) == sorted(sd)
                                                     and all(torch.equal(back[k], sd[k]) for k in sd))
            dist.barrier()
            out["tp1"][(base, method)] = verify.max_logits_difference(
                f"{root}/{base}/hf", mcore, seq=16, adapter=f"{work}/adapter")
    for base, method, tp, ep in LAYOUTS:
        out["layouts"][(base, method, tp, ep)] = verify.max_logits_difference(
            f"{root}/{base}/hf", f"{root}/{base}/mcore", tp=tp, ep=ep, seq=16,
            adapter=f"{root}/{base}/{method}/adapter")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("perft_export"))
    return root, run_distributed(_run, 2, root, timeout=900)[0]


def test_megatron_and_transformers_agree(built):
    _, out = built
    assert all(out["round_trip"].values()), out["round_trip"]
    for key, diff in {**out["tp1"], **out["layouts"]}.items():
        assert diff <= TOLERANCE, (key, diff)


def test_adapter_changes_transformers_logits_and_peft_is_refused(built):
    from transformers import AutoModelForCausalLM

    from megatron_mole.hf import load_mole_adapter

    root, _ = built
    for base, methods in PER_BASE.items():
        hf = f"{root}/{base}/hf"
        plain = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            want = plain(input_ids=tokens()).logits
        for method in methods:
            model = load_mole_adapter(copy.deepcopy(plain), f"{root}/{base}/{method}/adapter")
            with torch.no_grad():
                got = model(input_ids=tokens()).logits
            assert (got - want).abs().max() > 1e-3, (base, method)
    status = _cli("--checkpoint", f"{root}/mixtral/perft-s/saved", "--out", f"{root}/x_peft", "--format", "peft")
    assert status == 2 and not os.path.exists(f"{root}/x_peft")
