"""Training YAML schema: defaults, unknown keys and bad values named by dotted path,
override precedence, argparse flags, round trip through YAML, layout arithmetic."""
import argparse
import textwrap

import pytest
import yaml

from megatron_mole.errors import MoleError
from megatron_mole.training import train_config as T

MINIMAL = {"base": {"checkpoint": "/ckpt"}, "data": {"paths": ["train.jsonl"]}}


def _yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_yaml_loads_into_the_dataclass_tree(tmp_path):
    path = _yaml(tmp_path, """\
        base: {checkpoint: work/mcore, tokenizer: work/hf}
        parallel: {tp: 2, pp: 4, ep: 2, vpp: 2, sequence_parallel: true, micro_batch: 2, global_batch: 16}
        mole: {num_experts: 4, rank: 8, alpha: 16, top_k: 1, targets: [linear_fc1, linear_fc2]}
        optimizer: {lr: 2e-4, weight_decay: 0.01, betas: [0.9, 0.95], clip_grad: 0.5, distributed: false}
        schedule: {max_steps: 50, warmup_steps: 5, decay_style: linear, min_lr: 1e-5}
        data: {paths: a.jsonl, domain_weights: {math: 2, code: 1}, seq_length: 128, packing: true}
        logging: {log_jsonl: train.jsonl, tensorboard_dir: tb, interval: 5}
        checkpoint: {save_dir: ckpt, interval: 10, keep_last: 3, load_dir: old, load_step: 20}
        seed: 7
        precision: fp32
        """)
    cfg = T.load_train_config(path)
    assert cfg.base.tokenizer_dir == "work/hf"
    assert (cfg.parallel.tp, cfg.parallel.vpp, cfg.parallel.global_batch) == (2, 2, 16)
    assert cfg.mole == {"num_experts": 4, "rank": 8, "alpha": 16, "top_k": 1, "targets": ["linear_fc1", "linear_fc2"]}
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.betas == (0.9, 0.95)  # "2e-4" is a YAML 1.1 string
    assert cfg.schedule.min_lr == 1e-5 and isinstance(cfg.schedule.min_lr, float)
    assert cfg.data.paths == ["a.jsonl"] and cfg.data.domain_weights == {"math": 2.0, "code": 1.0}
    assert cfg.checkpoint.load_step == 20 and cfg.data_seed == 7


def test_defaults_from_a_minimal_config():
    cfg = T.config_from_dict(MINIMAL)
    assert cfg.parallel == T.ParallelConfig()
    assert cfg.base.tokenizer_dir == "/ckpt" and cfg.data_seed == cfg.seed == 1234
    assert cfg.mole == {} and cfg.precision == "auto"


@pytest.mark.parametrize("patch, key, message", [
    ({"optimizer": {"lrr": 1}}, "optimizer.lrr", "unknown key"),
    ({"parallel": {"expert": 2}}, "parallel.expert", "unknown key"),
    ({"extra": 1}, "extra", "unknown key"),
    ({"data": {"paths": ["a"], "weights": {}}}, "data.weights", "unknown key"),
    ({"base": {}}, "base.checkpoint", "missing required key"),
    ({"parallel": {"tp": "two"}}, "parallel.tp", "expected int, got 'two'"),
    ({"parallel": {"tp": True}}, "parallel.tp", "expected int, got True"),
    ({"parallel": {"tp": 0}}, "parallel.tp", "must be >= 1, got 0"),
    ({"parallel": {"vpp": 2}}, "parallel.vpp", "needs pp >= 2"),
    ({"parallel": {"micro_batch": 3, "global_batch": 8}}, "parallel.global_batch", "not a multiple of micro_batch=3"),
    ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel", "needs tp > 1"),
    ({"parallel": {"recompute": "all"}}, "parallel.recompute", "must be one of none, selective, full"),
    ({"parallel": {"recompute": "selective", "recompute_num_layers": 2}}, "parallel.recompute_num_layers",
     "applies to recompute: full only"),
    ({"parallel": {"recompute": "full", "recompute_method": "all"}}, "parallel.recompute_method",
     "must be 'uniform', 'block' or null"),
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr", "expected a number, got 'fast'"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas", "expected a list of 2 values"),
    ({"optimizer": {"betas": [0.9, 1.5]}}, "optimizer.betas", "each must lie in [0, 1)"),
    ({"schedule": {"decay_style": "step"}}, "schedule.decay_style", "must be one of constant, linear, cosine"),
    ({"schedule": {"min_lr": 1.0}}, "schedule.min_lr", "exceeds optimizer.lr"),
    ({"data": {"paths": []}}, "data.paths", "exactly one of them"),
    ({"data": {"paths": ["a"], "prefix": ["p"]}}, "data.paths", "exactly one of them"),
    ({"data": {"paths": ["a"], "domain_weights": {"m": -1}}}, "data.domain_weights.m", "must be >= 0"),
    ({"checkpoint": {"load_step": 3}}, "checkpoint.load_step", "needs checkpoint.load_dir"),
    ({"precision": "fp16"}, "precision", "must be one of auto, fp32, bf16"),
    ({"mole": [1]}, "mole", "expected a mapping"),
    ({"logging": 3}, "logging", "expected a mapping"),
])
def test_errors_name_the_dotted_key(patch, key, message):
    raw = {**MINIMAL, **patch}
    with pytest.raises(T.ConfigError) as info:
        T.config_from_dict(raw)
    assert info.value.key == key
    assert message in str(info.value) and str(info.value).startswith(f"config '{key}': ")


def test_override_precedence_yaml_then_set_then_flags(tmp_path):
    path = _yaml(tmp_path, """\
        base: {checkpoint: c}
        data: {paths: [a.jsonl]}
        schedule: {max_steps: 10}
        mole: {num_experts: 4}
        """)
    parser = argparse.ArgumentParser()
    T.add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--set", "schedule.max_steps=20", "--max-steps", "30",
                              "--set", "parallel.ep=2", "--set", "mole.top_k=2", "--set", "data.paths=[x,y]",
                              "--save", "out", "--save-interval", "5", "--load", "old", "--load-step", "4",
                              "--log-jsonl", "log.jsonl", "--set", "logging.tensorboard_dir=null"])
    cfg = T.config_from_args(args)
    assert cfg.schedule.max_steps == 30  # the named flag wins over --set
    assert cfg.parallel.ep == 2 and cfg.mole == {"num_experts": 4, "top_k": 2} and cfg.data.paths == ["x", "y"]
    assert (cfg.checkpoint.save_dir, cfg.checkpoint.interval) == ("out", 5)
    assert (cfg.checkpoint.load_dir, cfg.checkpoint.load_step) == ("old", 4)
    assert cfg.logging.log_jsonl == "log.jsonl" and cfg.logging.tensorboard_dir is None

    args = parser.parse_args(["--config", str(path), "--set", "optimizer.lrr=1"])
    with pytest.raises(T.ConfigError, match="config 'optimizer.lrr': unknown key"):
        T.config_from_args(args)
    with pytest.raises(T.ConfigError, match="expected KEY=VALUE"):
        T.load_train_config(path, ["optimizer.lr"])
    with pytest.raises(T.ConfigError, match="config 'seed': cannot set 'seed.x'"):
        T.load_train_config(path, ["seed=3", "seed.x=1"])


@pytest.mark.parametrize("mole, key, message", [
    ({"num_expert": 4}, "mole.num_expert", "unknown key (allowed here: num_experts, rank,"),
    ({"num_experts": 4, "top_k": 5}, "mole.top_k", "must be in [1, num_experts=4] (got 5)"),
    ({"router": "nope"}, "mole.router", "unknown router"),
    ({"rank": "8"}, "mole.rank", "must be an int (got '8')"),
    ({"router_args": {"x": 1}}, "mole.router_args", "(got {'x': 1})"),
])
def test_mole_section_is_checked_at_load(mole, key, message):
    # MoLEConfig is built when the config loads, its field errors renamed mole.<field>
    with pytest.raises(T.ConfigError) as info:
        T.config_from_dict({**MINIMAL, "mole": mole})
    assert info.value.key == key and message in info.value.message, str(info.value)
    assert str(info.value).startswith(f"config '{key}': ")
    assert isinstance(info.value, MoleError) and isinstance(info.value, ValueError)


def test_file_errors(tmp_path):
    with pytest.raises(T.ConfigError, match="invalid YAML"):
        T.load_train_config(_yaml(tmp_path, "base: [unclosed\n"))
    with pytest.raises(T.ConfigError, match="must hold a mapping, got list"):
        T.load_train_config(_yaml(tmp_path, "- 1\n"))


def test_round_trip_through_yaml(tmp_path):
    cfg = T.config_from_dict({**MINIMAL, "optimizer": {"lr": 3e-4, "betas": [0.8, 0.9]},
                              "mole": {"num_experts": 8, "targets": ["linear_fc1"]}, "parallel": {"ep": 4}})
    T.save_config(cfg, tmp_path / "out.yaml")
    assert T.load_train_config(tmp_path / "out.yaml") == cfg
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["optimizer"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("world, layout, expected", [
    (8, dict(tp=2, pp=2, micro_batch=1, global_batch=8), 2),
    (4, dict(tp=1, pp=1, micro_batch=2, global_batch=8), 4),
])
def test_data_parallel_size(world, layout, expected):
    assert T.ParallelConfig(**layout).data_parallel_size(world) == expected


def test_recompute_overrides_are_megatron_fields():
    from megatron.core.transformer import TransformerConfig

    P = T.ParallelConfig
    assert P().recompute_overrides() == {}
    assert P(recompute="selective").recompute_overrides() == {"recompute_granularity": "selective"}
    full = P(recompute="full", recompute_method="block", recompute_num_layers=2).recompute_overrides()
    assert full == {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2}
    assert P(recompute="full").recompute_overrides()["recompute_method"] == "uniform"
    fields = set(TransformerConfig.__dataclass_fields__)
    assert set(full) <= fields


def test_data_parallel_size_errors():
    with pytest.raises(T.ConfigError, match="tp=2 x pp=2 does not divide the world size 6"):
        T.ParallelConfig(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(T.ConfigError, match="global_batch=8 is not a multiple of micro_batch=2 x data-parallel size 8"):
        T.ParallelConfig(micro_batch=2, global_batch=8).data_parallel_size(8)
