"""Virtual pipeline stages: `train` at PP4 x VPP2 (Megatron's interleaved schedule, two model chunks per
rank) reproduces PP4's losses, and PP2 x VPP2 x DP2 PP2 x DP2's, on a tiny 8-layer Llama, 4 gloo
processes, adapters training (2 steps). At pp=2 the loop uses unbatched p2p ops (with Megatron's
batched ones the losses differed: tests/test_megatron_p2p.py)."""
import pytest
import yaml

from tests._dist import run_distributed


def _losses(config_path):
    from megatron_mole.training.loop import train
    from megatron_mole.training.train_config import load_train_config

    runs = {}
    for name, extra in (("pp4", []), ("pp4_vpp2", ["parallel.vpp=2"]), ("pp2", ["parallel.pp=2"]),
                        ("pp2_vpp2", ["parallel.pp=2", "parallel.vpp=2"])):
        result = train(load_train_config(config_path, extra))
        runs[name] = [r["loss"] for r in result.records]
    return runs


def test_interleaved_pipeline_matches_plain_pipeline(tmp_path):
    from megatron_mole.training.quickstart import build_base, convert

    hf_dir = build_base(tmp_path, seed=0, examples_per_domain=8, pretrain_steps=0, num_hidden_layers=8)
    convert(hf_dir, tmp_path / "mcore")
    config = {
        "base": {"checkpoint": str(tmp_path / "mcore"), "tokenizer": str(hf_dir)},
        "parallel": {"tp": 1, "pp": 4, "micro_batch": 1, "global_batch": 4},
        "mole": {"num_experts": 2, "rank": 4, "alpha": 8, "targets": ["linear_fc1", "linear_fc2", "linear_qkv"]},
        "optimizer": {"lr": 1.0e-2},
        "schedule": {"max_steps": 2, "warmup_steps": 0, "decay_style": "constant"},
        "data": {"paths": [str(tmp_path / "data" / "train.jsonl")], "seq_length": 32, "packing": True},
        "logging": {"progress": False},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    runs = run_distributed(_losses, 4, str(tmp_path / "config.yaml"), timeout=600)[0]
    assert len(runs["pp4"]) == 2 and runs["pp4"][1] != runs["pp4"][0]  # the second step sees trained adapters
    assert runs["pp4_vpp2"] == pytest.approx(runs["pp4"], rel=1e-6)
    assert runs["pp2_vpp2"] == pytest.approx(runs["pp2"], rel=1e-6)
    assert runs["pp2"] == pytest.approx(runs["pp4"], rel=1e-5)
