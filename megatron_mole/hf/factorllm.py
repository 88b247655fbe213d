"""Transformers-side FactorLLM models (``megatron-mole factorize`` + ``convert mcore-to-hf``).

No transformers MoE architecture computes FactorLLM's layer exactly: Mixtral, Qwen2-MoE,
OLMoE and Qwen3-MoE have no router bias and weight the chosen experts by their (re- or
un-normalised) softmax probabilities; GPT-OSS has a router bias but softmax weights and
a clamped activation with expert biases; DeepSeek-V3's bias only steers selection of
sigmoid scores. FactorLLM sums the top-K experts of ``W x + b`` with the constant weight
N/K. So the exported directory keeps the dense base's architecture (Llama, Mistral,
Qwen2: attention, norms, embeddings unchanged) with a ``factorllm`` section in its
config.json, and :func:`load_factorllm` puts :class:`FactorLLMMoE` in place of every MLP.
Its routing is routing/factorllm.py, the very functions the Megatron layer uses.

    from megatron_mole.hf import load_factorllm
    model = load_factorllm("factorised-hf").eval()

Tensor names per layer: ``mlp.gate.{weight,bias}`` [N, D], [N];
``mlp.experts.{e}.{gate,up,down}_proj.weight`` ([m, D], [m, D], [D, m]).

Legend: T tokens, D hidden, N experts, K chosen per token, m neurons per expert.
"""
import json
import os

import torch
from torch import nn

from megatron_mole.errors import CheckpointError
from megatron_mole.routing import factorllm as F


class _Expert(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class FactorLLMMoE(nn.Module):
    """``y = (N/K) * sum_{i in topK(W x + b)} E_i(x)``, in place of a SwiGLU MLP."""

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.scale = F.output_scale(num_experts, top_k)
        self.gate = nn.Linear(hidden, num_experts, bias=True)
        self.experts = nn.ModuleList(_Expert(hidden, inner) for _ in range(num_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        chosen_TK = F.select(F.router_logits(x_TD, self.gate.weight, self.gate.bias), self.top_k)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            rows = (chosen_TK == e).any(-1).nonzero().flatten()
            if rows.numel():
                y_TD.index_add_(0, rows, expert(x_TD[rows]) * self.scale)
        return y_TD.reshape(shape)


def _state_dict(hf_dir: str):
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing")
        sd.update(load_file(path))
    return sd


def load_factorllm(hf_dir: str, dtype=torch.float32):
    """A transformers causal LM of a factorised checkpoint (``config.json`` with ``factorllm``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    fl = getattr(config, "factorllm", None)
    if not fl:
        raise CheckpointError(f"{hf_dir}/config.json has no 'factorllm' section (not a factorised model)")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer in model.model.layers:
        layer.mlp = FactorLLMMoE(config.hidden_size, fl["expert_intermediate_size"], fl["num_experts"],
                                 fl["top_k"]).to(dtype)
    sd = _state_dict(hf_dir)
    result = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{hf_dir}: tensors missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if tied:
        model.tie_weights()
    return model


def is_factorllm_dir(hf_dir: str) -> bool:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("factorllm"))
