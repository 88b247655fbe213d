"""Conversion error paths: each a clear error naming the file or tensor, nothing left behind.

Errors found before a model is built run in the test process; those found against the
model's shapes run in one spawned process (they need the Megatron runtime).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_mole.checkpoint.convert import atomic_output_dir, hf_to_mcore, mcore_to_hf
from megatron_mole.checkpoint.hf_io import CheckpointError
from megatron_mole.checkpoint.spec import UnsupportedModelError, spec_from_hf_config
from tests._dist import run_distributed
from tests.test_convert import COMMON, make_hf_model


def _listing(path):
    return sorted(os.listdir(path))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_model("llama", str(tmp_path_factory.mktemp("src") / "llama"))


def _copy_model(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "wb") as b:
            b.write(a.read())
    return dst


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_existing_output_without_overwrite(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(out)):
        hf_to_mcore(llama_dir, str(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        mcore_to_hf(str(tmp_path), str(out))
    assert _listing(out) == ["keep.txt"] and _listing(tmp_path) == ["out"]


def test_unknown_architecture(llama_dir, tmp_path):
    src = _copy_model(llama_dir, str(tmp_path / "m"))
    _edit_config(src, model_type="no_such_model", architectures=["NoSuchModelForCausalLM"])
    with pytest.raises(CheckpointError, match="no_such_model"):
        hf_to_mcore(src, str(tmp_path / "out"))
    with pytest.raises(UnsupportedModelError, match="unknown architecture model_type='gpt2'"):
        spec_from_hf_config({"model_type": "gpt2", "vocab_size": 10})
    assert _listing(tmp_path) == ["m"]


def test_olmoe_is_refused_naming_the_feature():
    from transformers import OlmoeConfig

    with pytest.raises(UnsupportedModelError, match="q_norm/k_norm"):
        spec_from_hf_config(OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2))


@pytest.mark.parametrize("rope, field", [
    (dict(rope_type="yarn", rope_theta=1e4, factor=4.0), "rope_type"),
    (dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=2.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192), "low_freq_factor"),
])
def test_unrepresentable_rope_is_refused(rope, field):
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match=field):
        spec_from_hf_config(LlamaConfig(**COMMON, rope_parameters=rope))


def test_unrepresentable_options_are_refused():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(UnsupportedModelError, match="attention_bias=True is not supported"):
        spec_from_hf_config(LlamaConfig(**COMMON, attention_bias=True))
    with pytest.raises(UnsupportedModelError, match="mlp_bias=True is not supported"):
        spec_from_hf_config(LlamaConfig(**COMMON, mlp_bias=True))
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        spec_from_hf_config(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8))


def test_missing_and_truncated_shards(tmp_path):
    src = make_hf_model("qwen2_moe_sharded", str(tmp_path / "m"))
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    os.rename(os.path.join(src, files[1]), str(tmp_path / "aside"))
    with pytest.raises(CheckpointError, match=f"shard {files[1]} .* is missing"):
        hf_to_mcore(src, str(tmp_path / "out"))
    os.rename(str(tmp_path / "aside"), os.path.join(src, files[1]))
    path = os.path.join(src, files[2])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(CheckpointError, match=f"{files[2]} is truncated"):
        hf_to_mcore(src, str(tmp_path / "out"))
    assert _listing(tmp_path) == ["m"]


def test_mixed_dtypes_name_a_tensor(llama_dir, tmp_path):
    src = _copy_model(llama_dir, str(tmp_path / "m"))
    path = os.path.join(src, "model.safetensors")
    sd = load_file(path)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.bfloat16)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.norm.weight.*bfloat16.*--dtype"):
        hf_to_mcore(src, str(tmp_path / "out"))
    assert _listing(tmp_path) == ["m"]


def test_narrowing_dtype_warns_naming_a_tensor(llama_dir):
    from megatron_mole.checkpoint.convert import resolve_dtype
    from megatron_mole.checkpoint.hf_io import HFCheckpoint

    with HFCheckpoint(llama_dir) as ckpt:
        with pytest.warns(UserWarning, match="--dtype bfloat16 rounds tensors such as .lm_head.weight. \\(float32\\)"):
            assert resolve_dtype(ckpt, ckpt.keys(), "bfloat16") == torch.bfloat16
        assert resolve_dtype(ckpt, ckpt.keys(), "float64") == torch.float64  # widening: silent
        assert resolve_dtype(ckpt, ckpt.keys(), None) == torch.float32


def test_not_a_converted_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="mcore_config.json is missing"):
        mcore_to_hf(str(tmp_path), str(tmp_path / "out"))
    assert _listing(tmp_path) == []


def test_atomic_output_dir_cleans_up_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out)) as tmp:
            open(os.path.join(tmp, "partial"), "w").close()
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            raise RuntimeError("boom")
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["old"]
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["new"]


def _errors_against_the_model(root, llama_dir):
    """Errors that need the model's shapes: one spawned process, messages returned."""
    import argparse

    from megatron_mole.checkpoint import cli

    messages = {}

    def attempt(label, fn):
        try:
            fn()
            messages[label] = None
        except Exception as err:  # the test asserts on type and message
            messages[label] = f"{type(err).__name__}: {err}"

    def variant(label, edit_state=None, **config):
        src = _copy_model(llama_dir, os.path.join(root, label))
        if config:
            _edit_config(src, **config)
        if edit_state:
            path = os.path.join(src, "model.safetensors")
            sd = load_file(path)
            edit_state(sd)
            save_file(sd, path, metadata={"format": "pt"})
        attempt(label, lambda: hf_to_mcore(src, os.path.join(root, label + "_out")))

    variant("shape", intermediate_size=80)
    variant("missing", lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    variant("extra", lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    variant("untied_head", tie_word_embeddings=True)  # lm_head differs from embed_tokens
    # Old checkpoints carry rotary buffers: ignored on import, not written back.
    variant("inv_freq", lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    good = os.path.join(root, "good_out")
    hf_to_mcore(llama_dir, good)
    os.remove(next(os.path.join(good, "dist_ckpt", n) for n in os.listdir(os.path.join(good, "dist_ckpt"))
                   if n.endswith(".distcp")))
    attempt("damaged_dist", lambda: mcore_to_hf(good, os.path.join(root, "back")))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    messages["cli_status"] = cli.run(parser.parse_args(
        ["hf-to-mcore", "--hf", os.path.join(root, "shape"), "--out", os.path.join(root, "cli_out")]))
    messages["listing"] = sorted(os.listdir(root))
    return messages


def test_errors_against_the_model(llama_dir, tmp_path):
    (messages,) = run_distributed(_errors_against_the_model, 1, str(tmp_path), llama_dir, timeout=300)
    assert "CheckpointError" in messages["shape"]
    assert "'model.layers.0.mlp.gate_proj.weight'" in messages["shape"]
    assert "[96, 64]" in messages["shape"] and "[80, 64]" in messages["shape"]
    assert "'model.layers.1.self_attn.k_proj.weight' is missing" in messages["missing"]
    assert "model.layers.0.mlp.extra.weight" in messages["extra"]
    assert "['model.embed_tokens.weight'] and ['lm_head.weight'] should be tied" in messages["untied_head"]
    assert "CheckpointError" in messages["damaged_dist"] and "good_out" in messages["damaged_dist"]
    assert messages["cli_status"] == 2
    # Only the inputs and the one good conversion remain: no partial or temporary output.
    assert messages["inv_freq"] is None
    assert messages["listing"] == ["extra", "good_out", "inv_freq", "inv_freq_out", "missing", "shape", "untied_head"]


def test_plain_config_read_gives_transformers_spec(tmp_path):
    """Conversion reads config.json without transformers when that gives the same spec: it does
    for every test architecture as transformers saves it, and falls back (None) to AutoConfig
    for a legacy rope_scaling, a field left to the class default, or an unmapped model."""
    import transformers

    from megatron_mole.checkpoint.spec import plain_json_config
    from tests.test_convert import CASES

    for name, (cls_name, overrides, _) in CASES.items():
        directory = str(tmp_path / name)
        getattr(transformers, cls_name)(**{**COMMON, **overrides}).save_pretrained(directory)
        plain = plain_json_config(os.path.join(directory, "config.json"))
        assert isinstance(plain, dict), name
        reference = spec_from_hf_config(transformers.AutoConfig.from_pretrained(directory))
        assert spec_from_hf_config(plain) == reference, name
    with open(os.path.join(str(tmp_path / "mistral_window_headdim"), "config.json")) as f:
        original = json.load(f)
    path = str(tmp_path / "edited.json")
    for drop, edit in ((None, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
                       ("sliding_window", {}),  # MistralConfig's default (4096) would apply
                       ("rms_norm_eps", {}), (None, dict(model_type="olmoe"))):
        raw = {k: v for k, v in original.items() if k != drop}
        with open(path, "w") as f:
            json.dump({**raw, **edit}, f)
        assert plain_json_config(path) is None, (drop, edit)
