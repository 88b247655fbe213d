"""`megatron-mole train` end to end on a tiny converted Llama (hidden 64, 2 layers), 2 gloo processes.

One launch runs several jobs through the real entry point (``megatron_mole.cli.main``):

- A: 4 steps at EP2 x DP2 (LoRA experts sharded over the two ranks, all-to-all dispatch; Megatron's
  distributed optimizer, adapter dropout, packing), saving at steps 2 and 4;
- B: resumes A's step 2 at the same layout: steps 3-4 must give A's losses bit for bit (the
  optimizer shards, scheduler, data position and dropout RNG all matter: dropout is on);
- C/P/Q/D: resume A's step 2 without dropout at TP2 (C), PP2 (P), EP1 (Q) and at A's layout (D),
  one step: the adapters load at another layout, so C's, P's and Q's step-3 losses equal D's (the
  optimizer state is resharded in C, P and Q, which say so; a step's loss is computed before its
  update; test_train_resume.py checks the steps after it);
- H (megatron-core >= 0.19): D with ``base.model: hybrid``: the adapters trained on the GPTModel
  resume in Megatron's HybridModel of the same checkpoint: the same step-3 loss as D;
- E: ``--strict`` refuses the data's bad lines (exit status 2); A reports them, with line numbers;
- F: a fresh run saving into A's directory (which holds step 4) is refused before training;
- R: D with ``parallel.recompute: full``: the same step-3 loss and gradient norm;
- M: a memory limit below the estimate stops the job before loading, naming the biggest term;
- G: B again on A's data preprocessed (``data.prefix``, megatron-mole preprocess): B's losses bit
  for bit (same rows, same sampler state).

A separate job kills the process in the middle of its second checkpoint save: the first one stays
loadable and ``latest`` still names it.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

from tests._dist import run_distributed

LAYOUTS = {"C": ["parallel.tp=2", "parallel.ep=1"], "P": ["parallel.pp=2", "parallel.ep=1"],
           "Q": ["parallel.ep=1"], "D": [], "R": ["parallel.recompute=full"]}
BAD_LINES = {3: "{not json", 7: json.dumps({"messages": [{"role": "user", "content": "no domain"}]})}


@pytest.fixture(scope="module")
def work(tiny_train_base):
    work, hf_dir = tiny_train_base, tiny_train_base / "hf_base"
    lines = (work / "data" / "train.jsonl").read_text().splitlines()
    for number, text in sorted(BAD_LINES.items()):
        lines.insert(number - 1, text)
    (work / "data" / "bad.jsonl").write_text("\n".join(lines) + "\n")
    config = {
        "base": {"checkpoint": str(work / "mcore"), "tokenizer": str(hf_dir)},
        "parallel": {"tp": 1, "pp": 1, "ep": 2, "micro_batch": 1, "global_batch": 4},
        "mole": {"num_experts": 4, "rank": 4, "alpha": 8, "top_k": 1, "dropout": 0.1, "expert_scope": "mlp",
                 "targets": ["linear_fc1", "linear_fc2", "linear_qkv"], "dispatch": "alltoall"},
        "optimizer": {"lr": 1.0e-2, "clip_grad": 1.0, "distributed": True},
        "schedule": {"max_steps": 4, "warmup_steps": 1, "decay_style": "cosine"},
        "data": {"paths": [str(work / "data" / "bad.jsonl")], "seq_length": 32, "packing": True},
        "logging": {"progress": False},
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    from megatron_mole.training.preprocess import preprocess

    preprocess([work / "data" / "bad.jsonl"], hf_dir, work / "prefix", workers=1)
    return work


def _losses(path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, Path(path).read_text().splitlines())}


def _jobs(work):
    from megatron_mole.cli import main
    from megatron_mole.training.loop import train
    from megatron_mole.training.train_config import load_train_config

    work = Path(work)
    cfg = str(work / "config.yaml")
    out = {"A": main(["train", "--config", cfg, "--save", str(work / "A"), "--save-interval", "2",
                      "--log-jsonl", str(work / "A.jsonl")])}
    out["B"] = main(["train", "--config", cfg, "--load", str(work / "A"), "--load-step", "2",
                     "--save", str(work / "B"), "--log-jsonl", str(work / "B.jsonl")])
    from megatron_mole.runtime import compat

    hybrid = {"H": ["base.model=hybrid"]} if compat.hybrid_unavailable_reason() is None else {}
    for name, layout in {**LAYOUTS, **hybrid}.items():
        result = train(load_train_config(cfg, layout + ["mole.dropout=0.0"], {
            "checkpoint.load_dir": str(work / "A"), "checkpoint.load_step": 2, "schedule.max_steps": 3}))
        out[name] = {"loss": result.records[0]["loss"], "start": result.start_step,
                     "resharded": result.resharded, "record": result.records[0],
                     "bad": [str(b) for b in result.data_report.bad_lines], "params": result.adapter_params}
    # G: B on the preprocessed copy of A's data (data.prefix): same losses, bit for bit
    out["G"] = main(["train", "--config", cfg, "--set", "data.paths=[]", "--set", f"data.prefix={work / 'prefix'}",
                     "--load", str(work / "A"), "--load-step", "2", "--log-jsonl", str(work / "G.jsonl")])
    out["E"] = main(["train", "--config", cfg, "--strict"])
    out["F"] = main(["train", "--config", cfg, "--save", str(work / "A")])  # A holds step 4: refused
    from megatron_mole.training.memory import LIMIT_ENV

    os.environ[LIMIT_ENV] = "0.001"  # M: more memory than the (fake) device has: refused before loading
    try:
        out["M"] = main(["train", "--config", cfg])
    finally:
        del os.environ[LIMIT_ENV]
    return out


def test_resume_exact_and_at_another_layout(work, capfd):
    rank0, rank1 = run_distributed(_jobs, 2, str(work), timeout=600)
    assert rank0["A"] == rank0["B"] == 0 and rank1["A"] == 0
    a, b = _losses(work / "A.jsonl"), _losses(work / "B.jsonl")
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4]
    assert [b[3], b[4]] == [a[3], a[4]]  # bit for bit
    assert rank0["G"] == rank1["G"] == 0 and _losses(work / "G.jsonl") == b  # the preprocessed data path
    assert a[4] < a[1]

    d = rank0["D"]
    assert d["start"] == 2 and not d["resharded"]
    for other in ("C", "P", "Q"):
        assert rank0[other]["start"] == 2 and rank0[other]["resharded"]
        assert rank0[other]["loss"] == pytest.approx(d["loss"], rel=1e-5), other
    r = rank0["R"]["record"]  # activation recompute: the same step
    assert r["loss"] == d["record"]["loss"] and r["grad_norm"] == pytest.approx(d["record"]["grad_norm"], rel=1e-6)
    if "H" in rank0:  # GPT-trained adapters resumed in the HybridModel
        h = rank0["H"]
        assert h["start"] == 2 and h["loss"] == pytest.approx(d["loss"], rel=1e-5)
        assert h["record"]["expert_load"].keys() == d["record"]["expert_load"].keys()
        assert h["params"] == d["params"]
    p = rank0["P"]
    # the memory estimate counts exactly the adapter elements each rank holds (EP2, TP2, PP2 stages, EP1)
    from megatron_mole.training.memory import estimate, shapes_from_hf_config
    from megatron_mole.training.train_config import load_train_config

    shapes = shapes_from_hf_config(json.loads((work / "hf_base" / "config.json").read_text()))
    for name, layout in LAYOUTS.items():
        result = estimate(shapes, load_train_config(work / "config.yaml", layout), world_size=2, dtype_bytes=4)
        for rank, out in enumerate((rank0, rank1)):
            if name == "R":
                continue
            stage = "last stage" if name == "P" and rank == 1 else "first stage"
            assert out[name]["params"] == result[stage]["adapter_param_count"], (name, rank)
    assert p["record"]["expert_load"].keys() == d["record"]["expert_load"].keys()  # both stages reported
    record = d["record"]
    assert record["domain_loss"] and set(record["domain_loss"]) <= {"arithmetic", "capitalize", "reverse", "translate"}
    for layer in ("decoder.layers.0.mlp", "decoder.layers.1.mlp"):
        assert sum(record["expert_load"][layer]) == pytest.approx(1.0)
        assert record["aux"][layer]["load_balance"] >= 1.0 - 1e-6  # N * sum f_i P_i >= 1 at the optimum
    assert record["grad_norm"] > 0 and record["lr"] > 0 and record["tokens_per_s"] > 0

    path = str(work / "data" / "bad.jsonl")
    assert [line.split(": ")[0] for line in rank0["C"]["bad"]] == [f"{path}:{n}" for n in sorted(BAD_LINES)]
    assert rank0["E"] == rank1["E"] == rank0["F"] == rank1["F"] == rank0["M"] == rank1["M"] == 2
    captured = capfd.readouterr()
    assert "memory estimate for rank 0 (pipeline stage 0):" in captured.out  # printed at start
    assert ("the biggest term base_weights" in captured.err and "exceeds the 0.00 GiB available "
            "($MEGATRON_MOLE_MEMORY_LIMIT_GIB): raise parallel.tp or parallel.pp" in captured.err), captured.err
    assert f"{path}:3: invalid JSON" in captured.out + captured.err
    assert "adapters and optimizer state resharded" in captured.out
    assert f"{work / 'A'} already holds step_4, beyond this run's start (step 0)" in captured.err


def _killed_save(work, save_dir):
    from megatron_mole.cli import main
    from megatron_mole.checkpoint import ckpt_io

    rename = os.rename
    final = ckpt_io.step_dir(save_dir, 2).name

    def die_on_second(src, dst, *args, **kwargs):
        if Path(dst).name == final:  # the temporary step_2 directory renamed into place
            os._exit(17)  # killed after every file of step 2 was written, before rename and marker
        return rename(src, dst, *args, **kwargs)

    os.rename = die_on_second  # this process dies in the save; nothing to restore
    main(["train", "--config", str(Path(work) / "config.yaml"), "--set", "parallel.global_batch=2",
          "--set", "parallel.ep=1",
          "--max-steps", "3", "--save", save_dir, "--save-interval", "1"])


def test_killed_save_leaves_previous_checkpoint(work, tmp_path):
    from megatron_mole.checkpoint import ckpt_io

    with pytest.raises(RuntimeError, match="exit codes \\[17\\]"):
        run_distributed(_killed_save, 1, str(work), str(tmp_path), timeout=300)
    assert ckpt_io.latest_step(tmp_path) == 1
    checkpoint = ckpt_io.load_checkpoint(tmp_path, rank=0)
    assert checkpoint.step == 1 and checkpoint.shared["data"]["position"] > 0
    assert any(name.endswith("mole.router.weight") for name in checkpoint.shared["adapters"])
    assert checkpoint.shared["optimizer"]["adam_step"] == 1 and (tmp_path / ".tmp_step_2").is_dir()
    assert any(checkpoint.collective_dir.iterdir())  # the optimizer state, hashed in the manifest


def test_unknown_config_key_is_refused(work, capsys):
    from megatron_mole.cli import main

    assert main(["train", "--config", str(work / "config.yaml"), "--set", "optimizer.lrr=1e-3"]) == 2
    assert "config 'optimizer.lrr': unknown key" in capsys.readouterr().err
