"""HF -> Megatron -> HF conversion: bit-exact round trips and logits against transformers.

Tiny models of each architecture and option are built here (``make_hf_model``, also used
by the error tests). The references are independent of our code: the files ``save_pretrained`` wrote (keys,
dtypes, bytes of every tensor) and transformers' own forward pass. All conversions and
the TP1 logits run in one spawned process; the layouts TP2, PP2, EP2 (and MoE at
TP2 with sequence parallelism) run in one 2-process launch.
"""
import argparse
import filecmp
import json
import os

import pytest
import torch
from safetensors import safe_open

from tests._dist import run_distributed

TOLERANCE = 1e-4  # fp32, absolute
FP64_TOLERANCE = 1e-10  # verify's default on CPU: both models in float64, relative to the logits' scale
# Converted again by 2 processes in the 2-process launch (tied head, sharded index, stacked experts).
DIST_CASES = ["llama_tied_head_stored", "qwen2_moe_sharded", "mixtral_fused"]

# ---------------------------------------------------------------------------------------
# Tiny Hugging Face checkpoints, built locally (no hub). Every case is a transformers config
# (hidden 64, 2 layers, vocab ~128) plus how it is saved. Weights are re-drawn from a seeded
# generator with a larger spread than transformers' init so that norms differ from 1, biases
# from 0, and routers really route (a zero router would tie every expert).
# ---------------------------------------------------------------------------------------

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

# name -> (config class name, config overrides, save options)
CASES = {
    "llama": ("LlamaConfig", {}, {}),
    "llama_4_layers": ("LlamaConfig", dict(num_hidden_layers=4), {}),  # for a virtual pipeline
    "llama_mqa_tied_padded": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=100), {}),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192), max_position_embeddings=16384), {}),
    # bf16 on disk, float32 in Megatron (widening: still bit-exact back)
    "llama_linear_rope_bf16_to_fp32": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0)), dict(dtype="bfloat16", convert_dtype="float32")),
    # bf16 kept in Megatron; verify casts the loaded weights to fp32
    "llama_bf16": ("LlamaConfig", {}, dict(dtype="bfloat16")),
    "mistral_window_headdim": ("MistralConfig", dict(sliding_window=5, head_dim=32), {}),
    "llama_biases": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True), {}),
    "llama_tied_head_stored": ("LlamaConfig", dict(tie_word_embeddings=True), dict(store_tied_head=True)),
    "qwen2_bias_tied_padded": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-5, vocab_size=120), {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), {}),
    "mixtral_fused": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), dict(fused=True)),
    "qwen2_moe_sharded": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=48),
                          dict(max_shard_size="60KB")),
    "qwen2_moe_norm_topk": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=48, norm_topk_prob=True), {}),
    "qwen2_moe_dense_layer": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=48, mlp_only_layers=[1]), {}),
    "qwen2_moe_fused": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48), dict(fused=True)),
}


def _randomise(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def _fuse_experts(directory):
    """Rewrite per-expert files in transformers 5.x's fused in-memory layout:
    ``mlp.experts.gate_up_proj [E, 2F, H]`` ([gate; up] per expert), ``mlp.experts.down_proj``."""
    import re

    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    sd = load_file(path)
    # Mixtral names its per-expert projections w1 (gate), w3 (up), w2 (down).
    names = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    pattern = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
    out, experts = {}, {}
    for key, value in sd.items():
        match = pattern.match(key)
        if match:
            layer, expert, proj = int(match[1]), int(match[2]), names[match[3]]
            experts.setdefault(layer, {}).setdefault(expert, {})[proj] = value
        else:
            out[key.replace(".block_sparse_moe.", ".mlp.")] = value
    for layer, per_expert in experts.items():
        order = [per_expert[e] for e in sorted(per_expert)]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w["gate"], w["up"]]) for w in order])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([w["down"] for w in order])
    save_file(out, path, metadata={"format": "pt"})


def make_hf_model(name: str, directory: str, seed: int = 0) -> str:
    import transformers

    cls_name, overrides, save = CASES[name]
    config = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed)
    if save.get("dtype"):
        model = model.to(getattr(torch, save["dtype"]))
    kwargs = {"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}
    model.save_pretrained(directory, **kwargs)
    if save.get("fused"):
        _fuse_experts(directory)
    if save.get("store_tied_head"):  # some checkpoints store the tied head anyway
        from safetensors.torch import load_file, save_file

        path = os.path.join(directory, "model.safetensors")
        sd = load_file(path)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, path, metadata={"format": "pt"})
    # A tokenizer-like side file: conversion must copy it through byte for byte.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 256, "note": "copied verbatim"}\n')
    return directory


# ---------------------------------------------------------------------------------------


def _convert_all(root, names):
    """In one process: build, convert both ways, and compare logits at TP1 (float64, then
    float32 once); a bf16 conversion of fp32 weights; a corrupted tensor."""
    import contextlib
    import io
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_mole.checkpoint import verify

    out = {}
    for name in names:
        hf, mcore, back = (os.path.join(root, name, d) for d in ("hf", "mcore", "back"))
        make_hf_model(name, hf)
        hf_to_mcore(hf, mcore, dtype=CASES[name][2].get("convert_dtype"))
        mcore_to_hf(mcore, back)
        out[name] = verify.compare_logits(hf, mcore, seq=16)["max_rel"]
    llama_hf, llama_mcore = os.path.join(root, "llama", "hf"), os.path.join(root, "llama", "mcore")
    out["fp32"] = verify.compare_logits(llama_hf, llama_mcore, seq=16, dtype="float32")
    # fp32 weights converted to bf16: compared with the transformers model rounded the same way
    hf_to_mcore(llama_hf, os.path.join(root, "llama_to_bf16"), dtype="bfloat16")
    out["bf16"] = verify.compare_logits(llama_hf, os.path.join(root, "llama_to_bf16"), seq=16)
    # one weight of layer 1 off by 1e-3: the CLI fails and names layer 1
    corrupt = os.path.join(root, "llama_corrupt")
    shutil.copytree(llama_hf, corrupt)
    sd = load_file(os.path.join(corrupt, "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] += 1e-3
    save_file(sd, os.path.join(corrupt, "model.safetensors"), metadata={"format": "pt"})
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = verify.run(parser.parse_args(["--hf", corrupt, "--mcore", llama_mcore, "--seq", "8"]))
    out["corrupt"] = (status, printed.getvalue(),
                      verify.compare_logits(corrupt, llama_mcore, seq=8)["first_diverging_layer"])
    return out
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert"))
    (logits,) = run_distributed(_convert_all, 1, root, list(CASES), timeout=600)
    return root, logits


def _tensors(directory):
    files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            for key in f.keys():
                out[key] = (name, f.get_tensor(key))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact(converted, name):
    root, _ = converted
    hf, back = os.path.join(root, name, "hf"), os.path.join(root, name, "back")
    source, result = _tensors(hf), _tensors(back)
    assert sorted(source) == sorted(result)
    for key, (file, tensor) in source.items():
        back_file, back_tensor = result[key]
        assert back_file == file, key
        assert back_tensor.dtype == tensor.dtype, key
        assert back_tensor.shape == tensor.shape, key
        assert torch.equal(back_tensor.view(torch.uint8), tensor.view(torch.uint8)), key
    for side in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert filecmp.cmp(os.path.join(hf, side), os.path.join(back, side), shallow=False), side
    index = "model.safetensors.index.json"
    assert os.path.exists(os.path.join(back, index)) == os.path.exists(os.path.join(hf, index))
    if os.path.exists(os.path.join(hf, index)):
        with open(os.path.join(hf, index)) as a, open(os.path.join(back, index)) as b:
            assert json.load(a) == json.load(b)


@pytest.mark.parametrize("name", list(CASES))
def test_tp1_logits_match_transformers(converted, name):
    _, logits = converted
    assert logits[name] <= FP64_TOLERANCE, (name, logits[name])


def test_verify_fp32_bf16_and_corrupted(converted):
    _, results = converted
    fp32 = results["fp32"]
    # (0 is possible: with sdpa core attention, the default, both sides run torch sdpa)
    assert fp32["dtype"] == "float32" and fp32["ok"] and 0 <= fp32["max_rel"] <= 1e-4, fp32
    # bf16 weights on both sides, float64 compute: as exact as an fp32 conversion
    assert results["bf16"]["ok"] and results["bf16"]["max_rel"] <= FP64_TOLERANCE, results["bf16"]
    status, printed, first = results["corrupt"]
    assert status == 1 and first == 1, (status, first, printed)
    assert "FAILED" in printed and "first diverge at decoder layer 1" in printed, printed


def test_converted_checkpoint_layout(converted):
    root, _ = converted
    mcore = os.path.join(root, "llama_mqa_tied_padded", "mcore")
    with open(os.path.join(mcore, "mcore_config.json")) as f:
        spec = json.load(f)
    assert spec["gpt"]["vocab_size"] == 128 and spec["shapes"]["hf_vocab_size"] == 100
    assert spec["gpt"]["share_embeddings_and_output_weights"] is True
    assert spec["transformer"]["num_query_groups"] == 1
    assert os.path.exists(os.path.join(mcore, "dist_ckpt", "metadata.json"))
    leftovers = [n for n in os.listdir(os.path.join(root, "llama_mqa_tied_padded")) if n.startswith(".")]
    assert leftovers == []


def test_mqa_checkpoint_refuses_tp_larger_than_kv_heads(converted):
    from megatron_mole.checkpoint.spec import check_layout

    root, _ = converted
    with open(os.path.join(root, "llama_mqa_tied_padded", "mcore", "mcore_config.json")) as f:
        spec = json.load(f)
    with pytest.raises(ValueError, match="tp=2 does not divide num_query_groups=1"):
        check_layout(spec, tp=2)


# (name of the case, tp, pp, ep[, vpp]) run on 2 processes in one launch.
LAYOUTS = [
    ("llama", 2, 1, 1),
    ("llama_biases", 2, 1, 1),
    ("llama", 1, 2, 1),
    ("llama_mqa_tied_padded", 1, 2, 1),
    ("qwen2_bias_tied_padded", 2, 1, 1),
    ("mistral_window_headdim", 1, 2, 1),
    ("mixtral", 1, 1, 2),
    ("qwen2_moe_sharded", 1, 1, 2),
    ("mixtral", 2, 1, 1),
    ("qwen2_moe_norm_topk", 1, 2, 1),
    ("mixtral_fused", 1, 1, 2),
    ("llama_4_layers", 1, 2, 1, 2),
    ("qwen2_moe_dense_layer", 1, 2, 1),
    ("qwen2_moe_dense_layer", 1, 1, 2),
]
# The same checkpoints loaded as Megatron's HybridModel (megatron-core >= 0.19): (name, tp, pp, ep,
# vpp, "hybrid"), in the same launch.
HYBRID_LAYOUTS = [
    ("llama", 2, 1, 1, None, "hybrid"),
    ("mixtral", 2, 1, 1, None, "hybrid"),  # MoE at TP2: sequence parallel
    ("llama_4_layers", 1, 2, 1, 2, "hybrid"),
    ("qwen2_moe_dense_layer", 1, 2, 1, None, "hybrid"),
    ("qwen2_moe_sharded", 1, 1, 2, None, "hybrid"),
]


def _layouts():
    from megatron_mole.runtime import compat
    return LAYOUTS + (HYBRID_LAYOUTS if compat.hybrid_unavailable_reason() is None else [])


def _verify_layouts(root, layouts):
    from megatron_mole.checkpoint import verify
    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf

    # Both directions by 2 processes first (tp=pp=ep=1, each rank converts its share).
    for name in DIST_CASES:
        mcore_n2 = os.path.join(root, name, "mcore_n2")
        hf_to_mcore(os.path.join(root, name, "hf"), mcore_n2)
        mcore_to_hf(mcore_n2, os.path.join(root, name, "back_n2"))

    hf_calls = []  # (device of the tokens) per transformers run on this rank
    real_hf_logits = verify.hf_logits

    def counting_hf_logits(hf_dir, tokens_BS, adapter=None, **kwargs):
        hf_calls.append(tokens_BS.device.type)
        return real_hf_logits(hf_dir, tokens_BS, adapter, **kwargs)

    verify.hf_logits = counting_hf_logits
    out = []
    for name, tp, pp, ep, *rest in layouts:
        vpp, model = (rest + [None, "gpt"][len(rest):])[:2]
        hf, mcore = os.path.join(root, name, "hf"), os.path.join(root, name, "mcore")
        out.append(verify.compare_logits(hf, mcore, tp=tp, pp=pp, ep=ep, vpp=vpp, seq=16, model=model)["max_rel"])
    # The CLI path once: exit status 0 under the tolerance.
    parser = argparse.ArgumentParser()
    verify.add_arguments(parser)
    args = parser.parse_args(["--hf", os.path.join(root, "llama", "hf"), "--mcore",
                              os.path.join(root, "llama", "mcore"), "--tp", "2", "--seq", "8"])
    out.append(verify.run(args))
    # ... and exit status 1 above it: llama's transformers model against another rope.
    args = parser.parse_args(["--hf", os.path.join(root, "llama", "hf"), "--mcore",
                              os.path.join(root, "llama3_rope", "mcore"), "--seq", "8"])
    out.append(verify.run(args))
    out.append(hf_calls)
    return out


def test_verify_at_tp2_pp2_ep2(converted):
    root, _ = converted
    layouts = _layouts()
    results = run_distributed(_verify_layouts, 2, root, layouts, timeout=600)
    # transformers runs once per verification (the layouts and the 2 CLI runs), on one rank, on the CPU
    calls = [rank_result.pop() for rank_result in results]
    assert sum(len(c) for c in calls) == len(layouts) + 2 and set(calls[0] + calls[1]) == {"cpu"}, calls
    for rank_result in results:
        *diffs, status, mismatch_status = rank_result
        assert len(diffs) == len(layouts)
        for layout, diff in zip(layouts, diffs):
            assert diff <= FP64_TOLERANCE, (layout, diff)
        assert (status, mismatch_status) == (0, 1)
    assert results[0] == results[1]  # every rank reports the same all-reduced maximum


def dist_ckpt_contents(directory):
    """Every global tensor of a torch_dist checkpoint (read without a process group) and its
    metadata: global shape, dtype and the chunks it was saved in."""
    import tempfile

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    metadata = {}
    for key, meta in FileSystemReader(directory).read_metadata().state_dict_metadata.items():
        chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in getattr(meta, "chunks", []))
        metadata[key] = (tuple(getattr(meta, "size", ())), str(getattr(getattr(meta, "properties", None), "dtype", None)),
                         chunks)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, os.path.join(tmp, "all.pt"))
        tensors = torch.load(os.path.join(tmp, "all.pt"), weights_only=False)
    return tensors, metadata


def assert_same_dist_ckpt(expected_dir, actual_dir):
    expected, expected_meta = dist_ckpt_contents(os.path.join(expected_dir, "dist_ckpt"))
    actual, actual_meta = dist_ckpt_contents(os.path.join(actual_dir, "dist_ckpt"))
    assert actual_meta == expected_meta
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        if isinstance(tensor, torch.Tensor):
            assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
            assert torch.equal(actual[key].view(torch.uint8), tensor.view(torch.uint8)), key
    with open(os.path.join(expected_dir, "mcore_config.json")) as a, open(os.path.join(actual_dir, "mcore_config.json")) as b:
        assert json.load(a) == json.load(b)


def assert_same_hf_files(expected_dir, actual_dir):
    source, result = _tensors(expected_dir), _tensors(actual_dir)
    assert sorted(source) == sorted(result)
    for key, (file, tensor) in source.items():
        assert result[key][0] == file and result[key][1].dtype == tensor.dtype, key
        assert torch.equal(result[key][1].view(torch.uint8), tensor.view(torch.uint8)), key
    names = sorted(n for n in os.listdir(expected_dir) if not n.endswith(".safetensors"))
    assert names == sorted(n for n in os.listdir(actual_dir) if not n.endswith(".safetensors"))
    for name in names:  # index, config, tokenizer: byte for byte
        assert filecmp.cmp(os.path.join(expected_dir, name), os.path.join(actual_dir, name), shallow=False), name


def test_two_process_conversion_matches_one_process(converted):
    """Run by the 2-process launch of test_verify_at_tp2_pp2_ep2 (which must run first)."""
    root, _ = converted
    for name in DIST_CASES:
        if not os.path.exists(os.path.join(root, name, "back_n2")):
            pytest.skip("the 2-process launch did not run (run the whole file)")
        assert_same_dist_ckpt(os.path.join(root, name, "mcore"), os.path.join(root, name, "mcore_n2"))
        assert_same_hf_files(os.path.join(root, name, "hf"), os.path.join(root, name, "back_n2"))


def test_hybrid_model_of_converted_checkpoints():
    """HybridModel layouts run in test_verify_at_tp2_pp2_ep2's launch (megatron-core >= 0.19)."""
    from megatron_mole.runtime import compat
    reason = compat.hybrid_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    assert set(HYBRID_LAYOUTS) <= set(_layouts())
