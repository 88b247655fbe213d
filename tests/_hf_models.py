"""Tiny Hugging Face checkpoints for the converter tests, built locally (no hub).

Every case is a transformers config (hidden 64, 2 layers, vocab ~128) plus how it is
saved. Weights are re-drawn from a seeded generator with a larger spread than
transformers' init so that norms differ from 1, biases from 0, and routers really
route (a zero router would tie every expert).
"""
from __future__ import annotations

import os

import torch

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

# name -> (config class name, config overrides, save options)
CASES = {
    "llama": ("LlamaConfig", {}, {}),
    "llama_mqa_tied_padded": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True, vocab_size=100), {}),
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192), max_position_embeddings=16384), {}),
    "llama_linear_rope_bf16": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                        factor=2.0)), dict(dtype="bfloat16")),
    "mistral_window_headdim": ("MistralConfig", dict(sliding_window=5, head_dim=32), {}),
    "qwen2_bias_tied_padded": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-5, vocab_size=120), {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), {}),
    "mixtral_fused": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), dict(fused=True)),
    "qwen2_moe_sharded": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                 shared_expert_intermediate_size=48),
                          dict(max_shard_size="60KB")),
    "qwen2_moe_norm_topk": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=48, norm_topk_prob=True), {}),
}
MOE_CASES = [n for n, (cls, _, _) in CASES.items() if "Moe" in cls or "Mixtral" in cls]


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
    """Rewrite a per-expert Mixtral file in transformers 5.x's fused in-memory layout."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    sd = load_file(path)
    out, layers = {}, set()
    for key, value in sd.items():
        if ".block_sparse_moe." in key:
            layers.add(int(key.split(".")[2]))
        else:
            out[key] = value
    for layer in sorted(layers):
        prefix = f"model.layers.{layer}.block_sparse_moe."
        experts = sorted({int(k[len(prefix) + 8:].split(".")[0]) for k in sd if k.startswith(prefix + "experts.")})
        out[f"model.layers.{layer}.mlp.gate.weight"] = sd[prefix + "gate.weight"]
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{prefix}experts.{e}.w1.weight"], sd[f"{prefix}experts.{e}.w3.weight"]]) for e in experts])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [sd[f"{prefix}experts.{e}.w2.weight"] for e in experts])
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
    # A tokenizer-like side file: conversion must copy it through byte for byte.
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        f.write('{"model_max_length": 256, "note": "copied verbatim"}\n')
    return directory
