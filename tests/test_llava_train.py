"""``megatron-mole train`` on a LLaVA base (training/llava_family.py): image JSONL, MoLE on the LM,
Parrot's two stages, checkpoints, export.

One 2-process launch on the quickstart's tiny LLaVA (CLIP hidden 32, Llama hidden 64; not
pretrained) and its synthetic shape/colour images in four languages: MoLE (top-1, fc1/fc2) +
Parrot (2 experts; step 1 is stage 1, steps 2-3 stage 2) at TP2 saving every step; resumed from
step 1 (the stage-1 optimizer, then the switch) and from step 2 (the stage-2 optimizer: Parrot's
and the projector's Adam moments through dist_checkpointing) the losses and LRs equal the
uninterrupted run's bit for bit; TP1 x DP2 and PP2 give the same losses (1e-5), and so does step 3
resumed at PP2 from the TP2 checkpoint (optimizer state resharded); the last checkpoint,
exported by ``megatron-mole export``, runs in transformers within 1e-4 of Megatron. In process:
a bad config is a one-line ConfigError naming the field.
"""
import json
from pathlib import Path

import pytest

from tests._dist import run_distributed

STEPS = 3


def _config(work: Path, **sets) -> dict:
    config = {
        "base": {"checkpoint": str(work / "mcore"), "tokenizer": str(work / "hf_base")},
        "parallel": {"tp": 2, "micro_batch": 1, "global_batch": 2},
        "mole": {"num_experts": 2, "rank": 4, "alpha": 8, "top_k": 1, "targets": ["linear_fc1", "linear_fc2"],
                 "lora_b_init": "random", "seed": 3},
        "optimizer": {"lr": 1.0e-2, "distributed": True},
        "schedule": {"max_steps": STEPS, "warmup_steps": 1, "decay_style": "cosine"},
        "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 24},
        "logging": {"progress": False},
        "multimodal": {"parrot": {"num_experts": 2, "ffn_hidden_size": 32, "stage1_steps": 1}},
        "checkpoint": {"keep_last": None},
    }
    from megatron_mole.training.train_config import set_dotted

    for key, value in sets.items():  # a__b=value sets config["a"]["b"]
        set_dotted(config, key.replace("__", "."), value)
    return config


@pytest.fixture(scope="module")
def llava_work(tmp_path_factory):
    from megatron_mole.training.llava_quickstart import build_base

    work = tmp_path_factory.mktemp("llava_train")
    build_base(work, seed=0, pretrain_steps=0, per_combo=1)  # 96 image records, 4 languages
    return work


def _jobs(work):
    import argparse

    import torch.distributed as dist

    import megatron_mole as mm
    from megatron_mole.checkpoint import export_cli
    from megatron_mole.checkpoint.convert import hf_to_mcore
    from megatron_mole.checkpoint.llava_run import compare_llava_logits
    from megatron_mole.training.loop import train
    from megatron_mole.training.train_config import config_from_dict

    work = Path(work)
    info = mm.init_distributed(device="cpu")
    hf_to_mcore(str(work / "hf_base"), str(work / "mcore"), tp=2)
    out = {}

    def run(name, **sets):
        result = train(config_from_dict(_config(work, **sets)))
        out[name] = [(r["step"], r["loss"], r["lr"]) for r in result.records]

    save = str(work / "ckpt")
    run("tp2", checkpoint__save_dir=save, checkpoint__interval=1)
    run("tp2@1", checkpoint__load_dir=save, checkpoint__load_step=1)
    run("tp2@2", checkpoint__load_dir=save, checkpoint__load_step=2)
    run("tp1", parallel__tp=1)
    run("pp2", parallel__tp=1, parallel__pp=2)
    # another layout: the projector's and Parrot's Adam state resharded by dist_checkpointing
    run("pp2@2", parallel__tp=1, parallel__pp=2, checkpoint__load_dir=save, checkpoint__load_step=2)
    adapter = str(work / "adapter")
    if info.rank == 0:
        args = argparse.Namespace(checkpoint=save, step=None, base=None, out=adapter, overwrite=False, format="mole",
                                  merge=False, hf_base=None)
        out["export"] = export_cli.export(args)
    dist.barrier()
    out["verify"] = compare_llava_logits(str(work / "hf_base"), str(work / "mcore"), tp=2, pp=1, dtype="float32",
                                         device="cpu", adapter=adapter)
    out["exported"] = json.loads((Path(adapter) / "adapter_config.json").read_text())["multimodal"]
    return out


def test_train_llava_resume_layouts_export(llava_work):
    rank0, _ = run_distributed(_jobs, 2, str(llava_work), timeout=600)
    ref = rank0["tp2"]
    assert [s for s, _, _ in ref] == list(range(1, STEPS + 1))
    assert ref[0][1] != ref[1][1] != ref[2][1]
    # resumed at the stage boundary and inside stage 2: bit for bit
    assert rank0["tp2@1"] == ref[1:]
    assert rank0["tp2@2"] == ref[2:]
    for layout in ("tp1", "pp2"):
        assert len(rank0[layout]) == STEPS
        for (_, a, lr_a), (_, b, lr_b) in zip(rank0[layout], ref):
            assert abs(a - b) <= 1e-5 * abs(b) and lr_a == lr_b, layout
    assert [s for s, _, _ in rank0["pp2@2"]] == [3] and abs(rank0["pp2@2"][0][1] - ref[2][1]) <= 1e-5 * ref[2][1]
    assert "Parrot 2 experts" in rank0["export"] and "projector yes" in rank0["export"]
    assert rank0["exported"]["projector"] and rank0["exported"]["parrot"]["num_experts"] == 2
    assert rank0["verify"]["ok"], rank0["verify"]


def _write(path: Path, config: dict) -> str:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_bad_multimodal_configs_name_the_field(llava_work, tiny_train_base, tmp_path, capsys):
    """Each refusal happens before any process group or model (family_for runs first in train)."""
    from megatron_mole.checkpoint.llava import llava_spec_from_hf_config
    from megatron_mole.cli import main
    from megatron_mole.training.loop import train
    from megatron_mole.training.train_config import ConfigError, config_from_dict
    from transformers import AutoConfig

    # a LLaVA base's spec without weights: the checks read only the spec
    fake = tmp_path / "llava_mcore"
    (fake / "dist_ckpt").mkdir(parents=True)
    spec = llava_spec_from_hf_config(AutoConfig.from_pretrained(llava_work / "hf_base"))
    (fake / "mcore_config.json").write_text(json.dumps(spec))
    gpt = {"base__checkpoint": str(tiny_train_base / "mcore"), "base__tokenizer": str(tiny_train_base / "hf_base")}
    text_data = str(tiny_train_base / "data" / "train.jsonl")
    cases = [
        ("data.paths", dict(gpt, multimodal=None)),  # image records on a GPT base
        ("multimodal", dict(gpt, data__paths=[text_data])),  # the multimodal section on a GPT base
        ("data.packing", dict(base__checkpoint=str(fake), data__packing=True)),
        ("parallel.ep", dict(base__checkpoint=str(fake), parallel__ep=2)),
        ("data.seq_length", dict(base__checkpoint=str(fake), data__seq_length=60)),
        ("trainable", dict(base__checkpoint=str(fake), trainable="routers", multimodal=None)),
    ]
    for key, sets in cases:
        with pytest.raises(ConfigError) as error:
            train(config_from_dict(_config(llava_work, **sets)))
        assert error.value.key == key, (key, str(error.value))
    # checked when the config is read
    for key, sets in [("multimodal.parrot.stage1_steps", {"multimodal__parrot__stage1_steps": STEPS + 1}),
                      ("multimodal.projector_trainable", {"multimodal__projector_trainable": False}),
                      ("multimodal.parrot.lora_alpha", {"multimodal__parrot__lora_alpha": 8.0})]:
        with pytest.raises(ConfigError) as error:
            config_from_dict(_config(llava_work, **sets))
        assert error.value.key == key, (key, str(error.value))
    # through the CLI: one line, exit status 2
    path = _write(tmp_path / "bad.yaml", _config(llava_work, **dict(gpt, multimodal=None)))
    assert main(["train", "--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config 'data.paths'" in err[0] and "image record" in err[0], err
