"""Layout-independent initialisation of adapter tensors.

Each FULL tensor is drawn from its own CPU ``torch.Generator`` seeded by a hash
of (config seed, the tensor's global adapter name); the name contains the
global layer index and module path. A rank then keeps its slice, so the same
seed gives the same full tensors at any TP/PP/EP layout and whatever the
construction order.
"""
import hashlib
import math

import torch


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_init(name: str, shape, kind: str, fan_in: int, seed: int) -> torch.Tensor:
    """fp32 CPU tensor of ``shape``.

    kinds: ``"zeros"``; ``"mean"`` (1 / last dim); ``"kaiming"``: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    what PEFT's ``kaiming_uniform_(a=sqrt(5))`` gives LoRA A (and nn.Linear
    gives weights), used for A, routers and ``lora_b_init="random"``.
    """
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float32)
    if kind == "mean":  # every entry 1 / (last dim): a uniform distribution
        return torch.full(shape, 1.0 / shape[-1], dtype=torch.float32)
    if kind != "kaiming":
        raise ValueError(f"unknown init kind {kind!r} for tensor {name!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(seed, name))
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
