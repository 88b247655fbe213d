"""``load_mole_adapter`` in the pytest process (no Megatron): against a per-token loop, and errors.

Adapters are Megatron-named state dicts drawn at random (fused qkv rows interleaved per
query group, fused fc1 rows [gate; up]) and exported with the base's key maps; the
reference runs the original transformers model with each token's mixture computed by an
obvious loop from the *Megatron* tensors, so the split/fuse mapping is checked too.

Legend: T tokens, E experts, R rank, H hidden, F ffn.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_mole.hf import AdapterFormatError, load_mole_adapter

E, R, ALPHA = 3, 4, 8.0


def _model(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    config = LlamaConfig(**{**sizes, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _megatron_sd(seed=1, experts=E):
    """Random MLP-scope adapter (fc1 and fc2 experts, a router per MLP) and LoRA on qkv."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    sd = {}
    for layer in range(2):
        mlp, qkv = f"decoder.layers.{layer}.mlp", f"decoder.layers.{layer}.self_attention.linear_qkv"
        sd[f"{mlp}.mole.router.weight"] = rnd(experts, 64)
        sd[f"{mlp}.linear_fc1.mole.lora_a"] = rnd(experts, R, 64)
        sd[f"{mlp}.linear_fc1.mole.lora_b"] = rnd(experts, 192, R)
        sd[f"{mlp}.linear_fc2.mole.lora_a"] = rnd(experts, R, 96)
        sd[f"{mlp}.linear_fc2.mole.lora_b"] = rnd(experts, 64, R)
        sd[f"{qkv}.lora.lora_a"], sd[f"{qkv}.lora.lora_b"] = rnd(R, 64), rnd(128, R)
    return sd


def _cfg(top_k, experts=E):
    return dict(num_experts=experts, rank=R, alpha=ALPHA, top_k=top_k, router="topk", router_args={}, method="mole",
                targets=["linear_fc1", "linear_fc2", "linear_qkv"], layers=None, expert_scope="mlp",
                aux_loss_coeff=0.01, z_loss_coeff=0.0, lora_b_init="random", grouped_mm_backend="loop",
                dispatch="auto", seed=1, dropout=0.0)


def _export(tmp_path, model, sd, top_k, name="adapter", experts=E):
    from megatron_mole.checkpoint.adapters import export_adapter
    from megatron_mole.checkpoint.spec import spec_from_hf_config

    out = str(tmp_path / name)
    export_adapter(sd, _cfg(top_k, experts), spec_from_hf_config(model.config), out)
    return out


def _reference_hooks(model, sd, top_k):
    """Per-token MoLE on the original model: forward hooks on q/k/v_proj and replaced MLP forwards."""
    s = ALPHA / R
    heads, groups, d = 4, 2, 16
    handles = []
    for layer, block in enumerate(model.model.layers):
        qkv = f"decoder.layers.{layer}.self_attention.linear_qkv"
        delta_B = sd[f"{qkv}.lora.lora_b"] @ sd[f"{qkv}.lora.lora_a"]  # rows: per group [q x2 heads, k, v]
        per_group = delta_B.view(groups, heads // groups + 2, d, 64)
        parts = {"q": per_group[:, :2].reshape(-1, 64), "k": per_group[:, 2].reshape(-1, 64),
                 "v": per_group[:, 3].reshape(-1, 64)}
        for p, delta in parts.items():
            handles.append(getattr(block.self_attn, f"{p}_proj").register_forward_hook(
                lambda mod, inp, out, delta=delta: out + s * inp[0] @ delta.t()))
        mlp, prefix = block.mlp, f"decoder.layers.{layer}.mlp"

        def forward(x, mlp=mlp, prefix=prefix):
            w1 = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            out = torch.empty_like(x)
            for index in torch.cartesian_prod(*(torch.arange(n) for n in x.shape[:-1])):
                t = x[tuple(index)]
                p = torch.softmax(sd[f"{prefix}.mole.router.weight"] @ t, -1)
                top_p, top_e = p.topk(top_k)
                hbar, y2 = 0, 0
                for pk, e in zip(top_p, top_e):
                    a1, b1 = sd[f"{prefix}.linear_fc1.mole.lora_a"][e], sd[f"{prefix}.linear_fc1.mole.lora_b"][e]
                    z = w1 @ t + pk * s * b1 @ (a1 @ t)
                    h = F.silu(z[:96]) * z[96:]
                    a2, b2 = sd[f"{prefix}.linear_fc2.mole.lora_a"][e], sd[f"{prefix}.linear_fc2.mole.lora_b"][e]
                    hbar = hbar + pk / top_p.sum() * h
                    y2 = y2 + pk * s * b2 @ (a2 @ h)
                out[tuple(index)] = mlp.down_proj.weight @ hbar + y2
            return out
        mlp.forward = forward
    return handles


@pytest.mark.parametrize("top_k", [1, 2])
def test_loaded_adapter_equals_a_per_token_loop(tmp_path, top_k):
    sd = _megatron_sd()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    adapted = load_mole_adapter(_model(), _export(tmp_path, _model(), sd, top_k))
    reference = _model()
    _reference_hooks(reference, sd, top_k)
    with torch.no_grad():
        ours, ref, base = adapted(input_ids=ids).logits, reference(input_ids=ids).logits, _model()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2
    assert (ours - ref).abs().max() <= 1e-4
    # frozen weights are not held twice: the MLP's gate/up live only in the fused fc1
    names = [n for n, _ in adapted.named_parameters()]
    assert not any("gate_proj" in n for n in names) and "model.layers.0.mlp.base.linear_fc1.weight" in names
    # q, k, v share one A (one Megatron tensor)
    attn = adapted.model.layers[0].self_attn
    assert attn.q_proj.lora.lora_a is attn.v_proj.lora.lora_a


def _error(fn):
    with pytest.raises(AdapterFormatError) as info:
        fn()
    return str(info.value)


def test_loader_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _export(tmp_path, _model(), _megatron_sd(), 2)
    weights, config_path = os.path.join(directory, "adapter_model.safetensors"), os.path.join(directory,
                                                                                              "adapter_config.json")
    assert "already holds adapters" in _error(lambda: load_mole_adapter(load_mole_adapter(_model(), directory),
                                                                          directory))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    assert "'llama' base" in _error(lambda: load_mole_adapter(qwen, directory))
    # a model of other sizes: the tensor and its expected shape are named
    small = _model(intermediate_size=48)
    assert "model.layers.0.mlp.linear_fc1.mole.lora_b" in _error(lambda: load_mole_adapter(small, directory))
    assert "does not exist" in _error(lambda: load_mole_adapter(_model(), str(tmp_path / "nowhere")))

    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.k_proj.lora.lora_a"] += 1.0
    save_file(tensors, weights)
    assert "must be equal" in _error(lambda: load_mole_adapter(_model(), directory))
    del tensors["model.layers.1.self_attn.k_proj.lora.lora_a"]
    save_file(tensors, weights)
    assert "lacks tensor(s) ['model.layers.1.self_attn.k_proj.lora.lora_a']" in _error(
        lambda: load_mole_adapter(_model(), directory))
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert "truncated" in _error(lambda: load_mole_adapter(_model(), directory))
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({"peft_type": "LORA"}, f)
    assert "PEFT adapter" in _error(lambda: load_mole_adapter(_model(), directory))
    os.remove(config_path)
    assert "adapter_config.json is missing" in _error(lambda: load_mole_adapter(_model(), directory))
    assert config["format"] == "megatron_mole.adapter/1"


def test_export_refuses_tensors_of_no_module(tmp_path):
    from megatron_mole.checkpoint.hf_io import CheckpointError

    sd = _megatron_sd()
    sd["decoder.layers.0.self_attention.linear_nothing.lora.lora_a"] = torch.zeros(R, 64)
    with pytest.raises(CheckpointError, match="linear_nothing"):
        _export(tmp_path, _model(), sd, 1)
    sd = _megatron_sd()
    sd["decoder.layers.0.mlp.oddity"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="no known suffix"):
        _export(tmp_path, _model(), sd, 1)
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_one_expert_as_peft_and_merged(tmp_path):
    """One expert: the MoLE modules, PEFT's LoRA and the merged weights give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from megatron_mole.checkpoint.adapters import merge_into_base
    from megatron_mole.hf import read_adapter_dir
    from megatron_mole.hf.peft import write_peft_adapter

    _model().save_pretrained(tmp_path / "base")
    directory = _export(tmp_path, _model(), _megatron_sd(experts=1), 1, experts=1)
    config, tensors = read_adapter_dir(directory)
    write_peft_adapter(str(tmp_path / "peft"), config, tensors)
    merged = merge_into_base(config, tensors, str(tmp_path / "base"), str(tmp_path / "merged"))
    assert len(merged) == 2 * 6  # q, k, v, gate, up, down in both layers
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_mole_adapter(_model(), directory)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(_model(), str(tmp_path / "peft")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        base = _model()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-2
    assert (peft - ours).abs().max() <= 1e-4
    assert (merged - ours).abs().max() <= 1e-4
