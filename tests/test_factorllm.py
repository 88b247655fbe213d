"""FactorLLM: factorisation, the Prior-Approximate loss, training at EP1/EP2/PP2/TP2(+SP) and EP2 with full recompute,
LoRA adapters on the frozen experts (EP1/EP2/TP2), resume from training checkpoints.

References are independent of the code under test: the dense model's own logits
(Megatron's dense GPTModel), a per-token hand computation of KL(p || q) in plain Python
loops, the same training job at another layout or uninterrupted, and the exported model in
transformers (the expert errors by hand from its experts). One 2-process launch runs the
factorisations, the logit checks, the bad-input errors and the training jobs.
"""
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from megatron_mole.checkpoint.factorize import neuron_split
from megatron_mole.routing import factorllm as F
from tests._dist import run_distributed


def _hand_pa(logits, errors, k, mask):
    """KL(p || q) per token by the formulas of DESIGN §6, one token and expert at a time."""
    total, count = 0.0, 0
    for t in range(logits.shape[0]):
        if not mask[t]:
            continue
        z = [float(v) for v in logits[t]]
        exps = [math.exp(v - max(z)) for v in z]
        p = [e / sum(exps) for e in exps]
        best = sorted(range(len(z)), key=lambda i: (float(errors[t, i]), i))[:k]
        n = len(z)
        denom = k * math.e + n - k
        q = [(math.e if i in best else 1.0) / denom for i in range(n)]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        count += 1
    return total / count


def test_pa_loss_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    errors = torch.rand(7, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    for k in (1, 2, 3):
        got = F.pa_loss(logits, errors, k, mask)
        assert abs(float(got) - _hand_pa(logits, errors, k, mask)) < 1e-6
    # per token: the loss of a micro-batch of 2 sequences is the mean of their losses (same counts)
    a = F.pa_loss(logits[:3], errors[:3], 2)
    b = F.pa_loss(logits[3:6], errors[3:6], 2)
    assert torch.allclose(F.pa_loss(logits[:6], errors[:6], 2), (a + b) / 2)
    # the errors: mean over features of (E_i - T / (N/K))^2
    outs, teacher = torch.randn(3, 4, 5, generator=gen), torch.randn(3, 5, generator=gen)
    want = ((outs - teacher[:, None] / 2.0) ** 2).mean(-1)
    assert torch.allclose(F.expert_errors(outs, teacher, 2.0), want)


def test_clustered_split_is_balanced_and_finds_planted_groups():
    gen = torch.Generator().manual_seed(1)
    hidden, n, m = 16, 4, 6
    centres = torch.randn(n, 3 * hidden, generator=gen)
    owner = torch.randperm(n * m, generator=gen) % n  # neuron j belongs to group owner[j]
    feats = centres[owner] + 0.05 * torch.randn(n * m, 3 * hidden, generator=gen)
    gate, up, down = feats[:, :hidden], feats[:, hidden:2 * hidden], feats[:, 2 * hidden:].t()
    perm = neuron_split(gate, up, down, n, "clustered", seed=3)
    assert sorted(perm.tolist()) == list(range(n * m))
    for e in range(n):
        assert len(set(owner[perm[e * m:(e + 1) * m]].tolist())) == 1  # one planted group per expert
    assert torch.equal(neuron_split(gate, up, down, n, "contiguous"), torch.arange(n * m))


# ------------------------------------------------------------------ the 2-process launch
def _train_cfg(work, **extra):
    from megatron_mole.training.train_config import config_from_dict

    raw = {
        "base": {"checkpoint": str(work / "fac"), "tokenizer": str(work / "hf_base")},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "micro_batch": 2, "global_batch": 4},
        "mole": {"method": "factorllm"},
        "optimizer": {"lr": 2.0e-2, "clip_grad": 0.0, "distributed": False},
        "schedule": {"max_steps": 3, "decay_style": "constant"},
        "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 32},
        "logging": {"progress": False},
    }
    for dotted, value in extra.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(raw)


def _routers(trainer):
    return {n: p.detach().clone() for ddp in trainer.model for n, p in ddp.module.named_parameters()
            if ".router." in n}


def _job(work):
    import megatron_mole.runtime as runtime
    from megatron_mole.checkpoint.factorize import factorize
    from megatron_mole.checkpoint.mcore import load_model
    from megatron_mole.errors import ConfigError
    from megatron_mole.training.loop import Trainer

    import time

    work = Path(work)
    out = {"t": {}}
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        out["t"][name], clock[0] = round(now - clock[0], 1), now

    mcore = str(work / "mcore")
    factorize(mcore, str(work / "fac"), 4, top_k=2)
    factorize(mcore, str(work / "clustered"), 4, top_k=2, split="clustered")
    errors = {}
    for name, call in {"divides": lambda: factorize(mcore, str(work / "bad"), 3),
                       "missing": lambda: factorize(str(work / "nope"), str(work / "bad"), 4),
                       "moe": lambda: factorize(str(work / "fac"), str(work / "bad"), 2),
                       "exists": lambda: factorize(mcore, str(work / "fac"), 4)}.items():
        try:
            call()
            errors[name] = None
        except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
            errors[name] = str(err)
    out["errors"], out["bad_written"] = errors, (work / "bad").exists()
    lap("factorize")

    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None].expand(2, 16)
    logits = {}
    # all 4 experts on (weight N/K = 1): the checkpoints loaded with top-k overridden to 4
    for name, (directory, overrides) in {"mcore": ("mcore", None), "fac": ("fac", None),
                                         "all": ("fac", {"moe_router_topk": 4}),
                                         "all_clustered": ("clustered", {"moe_router_topk": 4})}.items():
        with torch.no_grad():
            model = load_model(str(work / directory), config_overrides=overrides).eval()
            logits[name] = model(tokens, pos, None)
    scale = float(logits["mcore"].abs().max())
    out["logit_diff"] = {n: float((logits[n] - logits["mcore"]).abs().max()) / scale for n in logits}
    lap("logits")

    losses, aux = {}, {}
    # TP2 runs the MoE layers under sequence parallelism (Megatron's rule; load_model sets it), the
    # experts' neurons split over expert tensor parallelism: each rank sees half of every sequence
    for name, layout in {"EP1": {}, "EP2": {"parallel__ep": 2}, "PP2": {"parallel__pp": 2},
                         "TP2": {"parallel__tp": 2},
                         "TP2SP": {"parallel__tp": 2, "parallel__sequence_parallel": True},
                         # full recompute: the hook runs in the replay only (grad enabled), once
                         "EP2full": {"parallel__ep": 2, "parallel__recompute": "full"}}.items():
        trainer = Trainer(_train_cfg(work, **layout))
        result = trainer.run()
        losses[name] = [r["loss"] for r in result.records]
        aux[name] = result.records[-1]["aux"]
        if name == "TP2":
            out["tp2_sequence_parallel"] = trainer.sequence_parallel
    out["losses"], out["aux"] = losses, aux
    lap("train_layouts")
    out["adapters"] = _adapter_runs(work, tokens, pos)
    lap("train_adapters")
    out["resumed"] = _resumed_runs(work)
    lap("resume")
    # routers only, PA loss alone (no balance loss): the routers move; with no PA loss they do not
    moved, trained = {}, {}
    for name, coeff in {"pa": 0.05, "none": 0.0}.items():
        cfg = _train_cfg(work, factorllm__trainable="routers", factorllm__balance_loss_coeff=0.0,
                         factorllm__pa_loss_coeff=coeff, schedule__max_steps=2 if coeff else 1,
                         checkpoint__save_dir=str(work / f"save_{name}"))
        trainer = Trainer(cfg)
        before = _routers(trainer)
        trainable = sorted(n for ddp in trainer.model for n, p in ddp.module.named_parameters() if p.requires_grad)
        trainer.run()
        after = trained[name] = _routers(trainer)
        moved[name] = max(float((after[n] - before[n]).abs().max()) for n in before)
        out["trainable_" + name] = trainable
    out["moved"] = moved
    lap("train_routers")
    # the saved model: a converted checkpoint holding the trained routers, no teacher
    saved = load_model(str(work / "save_pa" / "model_step_2"))
    # export to Hugging Face (our module in a Llama: hf/factorllm.py) and verify it against Megatron at EP2
    from megatron_mole.checkpoint import verify
    from megatron_mole.checkpoint.convert import mcore_to_hf
    from megatron_mole.cli import main

    mcore_to_hf(str(work / "save_pa" / "model_step_2"), str(work / "trained_hf"))
    out["verify"] = verify.compare_logits(str(work / "trained_hf"), str(work / "save_pa" / "model_step_2"),
                                          ep=2, seq=8, dtype="float64")["max_rel"]
    out["cli_status"] = main(["factorize", "--mcore", mcore, "--out", str(work / "bad"), "--experts", "5"])
    routers = {n: p for n, p in saved.named_parameters() if ".router." in n}
    out["saved_router_equal"] = len(routers) == 4 and all(torch.equal(p, trained["pa"][n]) for n, p in routers.items())
    out["saved_names"] = sorted(saved.state_dict())
    lap("export_verify")
    runtime.shutdown()
    out["work"] = str(work)
    return out


def _adapter_runs(work, tokens, pos):
    """LoRA on the frozen experts (trainable: adapters+routers) at EP1, EP2 and TP2 (expert TP 2, saved too); the EP1 model saved
    (adapters merged), exported to Hugging Face and run there beside the live Megatron model."""
    from megatron_mole.checkpoint.convert import mcore_to_hf
    from megatron_mole.hf import load_factorllm
    from megatron_mole.training.loop import Trainer

    from megatron_mole.errors import ConfigError

    out = {"refused": {}}
    for name, bad in {"dropout": {"mole__dropout": 0.1}}.items():
        try:
            Trainer(_train_cfg(work, factorllm__trainable="adapters+routers", **bad))
        except ConfigError as error:
            out["refused"][name] = str(error)
    for name, layout in {"EP1": {"checkpoint__save_dir": str(work / "save_adapters")},
                         "EP2": {"parallel__ep": 2},
                         # the experts' neurons split over expert TP: fc1's LoRA B and fc2's LoRA A sharded
                         "TP2": {"parallel__tp": 2, "checkpoint__save_dir": str(work / "save_adapters_tp2")}}.items():
        # clip_grad far above the norm: Megatron computes the global grad norm (which must count the
        # split and the replicated adapter factors right at every layout) without clipping
        trainer = Trainer(_train_cfg(work, factorllm__trainable="adapters+routers", mole__rank=4, mole__alpha=8.0,
                                     optimizer__clip_grad=1.0e9, **layout))

        def params():
            return {n: p.detach().clone() for ddp in trainer.model for n, p in ddp.module.named_parameters()}

        before = params()
        records = trainer.run().records
        out[name], out["aux_" + name] = [r["loss"] for r in records], records[-1]["aux"]
        out["grad_norm_" + name] = [r["grad_norm"] for r in records]
        if name == "TP2":  # the merged export saved at TP2 is the model saved at TP1
            from megatron_mole.checkpoint.mcore import load_model

            saved = [dict(load_model(str(work / d / "model_step_3")).named_parameters())
                     for d in ("save_adapters", "save_adapters_tp2")]
            out["tp2_saved_diff"] = {n: float((p - saved[1][n]).abs().max()) for n, p in saved[0].items()
                                     if ".experts." in n}
        if name != "EP1":
            continue
        after = params()  # after the save, which merges the adapters for a while
        groups = {"lora": lambda n: ".lora." in n, "router": lambda n: ".router." in n,
                  "expert_base": lambda n: ".experts." in n and ".lora." not in n}
        named = list(groups.values())
        groups["rest"] = lambda n: not any(g(n) for g in named)
        out["counts"] = {g: sum(map(test, before)) for g, test in groups.items()}
        out["changed"] = {g: [n for n in before if test(n) and not torch.equal(before[n], after[n])]
                          for g, test in groups.items()}
        out["trainable"] = sorted({n.split(".")[-1] for ddp in trainer.model
                                   for n, p in ddp.module.named_parameters() if p.requires_grad})
        model = trainer.model[0].module
        # the PA loss's per-expert errors of layer 0 on some inputs: the experts run with their adapters
        moe = model.decoder.layers[0].mlp
        hook = next(h for h in moe._forward_hooks.values() if hasattr(h, "errors"))
        x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
        out["x"], out["errors"] = x.tolist(), hook.errors(x).tolist()  # lists: the child process exits
        model.eval()
        with torch.no_grad():
            megatron = model(tokens, pos, None)
        mcore_to_hf(str(work / "save_adapters" / "model_step_3"), str(work / "adapters_hf"))
        with torch.no_grad():
            hf = load_factorllm(str(work / "adapters_hf")).eval()(tokens).logits
        megatron_V = megatron[..., :hf.shape[-1]]  # Megatron pads the vocabulary
        out["hf_vs_megatron"] = float((hf - megatron_V).abs().max()) / float(megatron_V.abs().max())
        out["adapter_effect"] = float((megatron - model_without_adapters(work, tokens, pos)).abs().max())
    return out


def _resumed_runs(work):
    """Runs stopped after step 2 (a training checkpoint there) and resumed to step 3: experts and
    routers at EP1, adapters and routers at EP2 resumed at TP2 (the uninterrupted runs are above)."""
    from megatron_mole.training.loop import Trainer

    out = {}
    adapters = {"factorllm__trainable": "adapters+routers", "mole__rank": 4, "mole__alpha": 8.0}
    # (first run, resumed run): the adapters' run resumes at another layout (resharded)
    # (EP2 -> TP2: from experts split over EP to each expert's neurons split over expert TP)
    for name, (extra, again) in {"experts": ({}, {}),
                                 "adapters": ({**adapters, "parallel__ep": 2}, {**adapters, "parallel__tp": 2})}.items():
        save = str(work / f"resume_{name}")
        first = Trainer(_train_cfg(work, schedule__max_steps=2, checkpoint__save_dir=save, **extra)).run()
        second = Trainer(_train_cfg(work, checkpoint__load_dir=save, checkpoint__save_dir=save, **again)).run()
        out[name] = {"losses": [r["loss"] for r in first.records + second.records],
                     "aux": second.records[-1]["aux"], "start": second.start_step, "resharded": second.resharded}
    return out


def model_without_adapters(work, tokens, pos):
    """The factorised base's logits: what the EP1 run started from."""
    from megatron_mole.checkpoint.mcore import load_model

    with torch.no_grad():
        return load_model(str(work / "fac")).eval()(tokens, pos, None)


@pytest.fixture(scope="module")
def launched(tiny_train_base):
    results = run_distributed(_job, 2, str(tiny_train_base), timeout=600)
    return results[0]


def test_factorisation_with_all_experts_equals_dense(launched):
    print("phase seconds:", launched["t"])
    diff = launched["logit_diff"]
    assert diff["all"] < 1e-5 and diff["all_clustered"] < 1e-5
    assert diff["fac"] > 1e-2  # top-2 of 4 is another model: the check can fail


def test_factorize_refuses_bad_input(launched):
    errors = launched["errors"]
    assert launched["cli_status"] == 2
    assert "--experts=3 does not divide" in errors["divides"] and "ffn_hidden_size=176" in errors["divides"]
    assert "nope" in errors["missing"]
    assert "already factorised" in errors["moe"]
    assert "already exists" in errors["exists"]
    assert not launched["bad_written"]


def test_training_losses_equal_at_ep1_ep2_pp2_tp2(launched):
    losses, aux = launched["losses"], launched["aux"]
    assert len(losses["EP1"]) == 3 and launched["tp2_sequence_parallel"]
    for name in ("EP2", "PP2", "TP2", "TP2SP", "EP2full"):
        print("layout", name, max(abs(a - b) / abs(a) for a, b in zip(losses["EP1"], losses[name])),
              max(abs(s["pa_loss"] - aux[name][k]["pa_loss"]) / s["pa_loss"] for k, s in aux["EP1"].items()))
        for a, b in zip(losses["EP1"], losses[name]):
            assert abs(a - b) <= 1e-5 * abs(a), (name, losses)
        # the PA and balance losses of step 3 (after two router updates), over all non-padding tokens
        assert aux[name].keys() == aux["EP1"].keys(), name
        for layer, stats in aux["EP1"].items():
            for key in ("pa_loss", "balance_loss", "prior_agreement"):
                assert abs(stats[key] - aux[name][layer][key]) <= 1e-5 * abs(stats[key]), (name, layer, key, aux)
    stats = next(iter(aux["EP1"].values()))
    assert stats["pa_loss"] > 0 and 0 < stats["prior_agreement"] < 1


def test_router_learns_from_the_pa_loss_alone(launched):
    assert launched["moved"]["pa"] > 1e-4
    assert launched["moved"]["none"] == 0.0
    assert launched["trainable_pa"] and all(".router." in n for n in launched["trainable_pa"])
    assert launched["saved_router_equal"]
    assert not any("teacher" in n or "dense" in n for n in launched["saved_names"])


def test_export_runs_in_transformers_and_verifies(launched):
    assert launched["verify"] < 1e-10  # float64 on both sides


def test_adapters_on_frozen_experts(launched):
    ad = launched["adapters"]
    counts, changed = ad["counts"], ad["changed"]
    assert counts["lora"] == 2 * 2 * 4 * 2  # A and B, fc1 and fc2, 4 experts, 2 layers
    assert len(changed["lora"]) == counts["lora"] and len(changed["router"]) == counts["router"] == 4
    assert counts["expert_base"] == 16 and changed["expert_base"] == [] and changed["rest"] == []
    assert ad["trainable"] == ["bias", "lora_a", "lora_b", "weight"]  # router weight and bias, the LoRA
    for other in ("EP2", "TP2"):
        for a, b in zip(ad["EP1"], ad[other]):
            assert abs(a - b) <= 1e-5 * abs(a), (other, ad)
        # the global grad norm (what clipping scales by) counts each adapter factor once at any layout
        print("grad norms", other, ad["grad_norm_EP1"], ad["grad_norm_" + other])
        for a, b in zip(ad["grad_norm_EP1"], ad["grad_norm_" + other]):
            assert a is not None and a > 0 and abs(a - b) <= 1e-5 * a, (other, ad["grad_norm_EP1"], ad["grad_norm_" + other])
    # TP2 saved the merged model per expert-TP shard: the same expert weights as EP1's (fc1 and fc2, 2 layers)
    assert len(ad["tp2_saved_diff"]) == 16 and max(ad["tp2_saved_diff"].values()) <= 1e-6, ad["tp2_saved_diff"]
    refused = ad["refused"]
    assert "mole.dropout=0.1" in refused["dropout"], refused
    # the export (adapters merged into the expert weights) runs in transformers as the live model does
    assert ad["adapter_effect"] > 1e-3
    print("adapters: logits rel diff HF vs Megatron", ad["hf_vs_megatron"], "losses", ad["EP1"], ad["EP2"], ad["TP2"],
          "TP2 saved experts max diff", max(ad["tp2_saved_diff"].values()))
    assert ad["hf_vs_megatron"] < 1e-5
    # the errors the routers learn from: E_i with its adapter (the exported, merged expert) against the
    # dense FFN (the sum of the untrained experts: trained_hf trained the routers only), by hand
    from megatron_mole.hf import load_factorllm

    work = Path(launched["work"])
    with torch.no_grad():
        adapted = load_factorllm(str(work / "adapters_hf")).model.layers[0].mlp
        base = load_factorllm(str(work / "trained_hf")).model.layers[0].mlp
        x, errors = torch.tensor(ad["x"]), torch.tensor(ad["errors"])
        teacher = sum(expert(x) for expert in base.experts)
        want = torch.stack([((expert(x) - teacher / 2.0) ** 2).mean(-1) for expert in adapted.experts], dim=1)
        unadapted = torch.stack([((expert(x) - teacher / 2.0) ** 2).mean(-1) for expert in base.experts], dim=1)
    assert torch.allclose(errors, want, rtol=1e-4, atol=1e-9), (errors, want)
    assert not torch.allclose(unadapted, want, rtol=1e-3, atol=1e-9)


def test_resumed_run_reproduces_the_uninterrupted_one(launched):
    resumed, ad = launched["resumed"], launched["adapters"]
    references = {"experts": (launched["losses"]["EP1"], launched["aux"]["EP1"]),
                  "adapters": (ad["EP2"], ad["aux_EP2"])}
    for name, (losses, aux) in references.items():
        got = resumed[name]
        print("resumed", name, max(abs(a - b) / abs(a) for a, b in zip(losses, got["losses"])))
        assert got["start"] == 2 and len(got["losses"]) == 3 and got["resharded"] == (name == "adapters")
        for a, b in zip(losses, got["losses"]):
            assert abs(a - b) <= 1e-6 * abs(a), (name, losses, got["losses"])
        # step 3's PA loss: the teacher is the factorised base's dense FFN, not the trained experts
        for layer, stats in aux.items():
            assert abs(stats["pa_loss"] - got["aux"][layer]["pa_loss"]) <= 1e-6 * stats["pa_loss"], (name, layer)
