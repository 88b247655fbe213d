"""Tiny Megatron-core GPT models and a training loop for parity tests.

``build_gpt``, ``make_batches`` and ``train`` come from the smoke command
(:mod:`tools.smoke`); this file adds layout-independent init.

* ``build_gpt`` builds Megatron's own ``GPTModel`` from Megatron's own
  ``get_gpt_layer_local_spec`` at the current parallel layout (RMSNorm, GQA,
  SwiGLU, no biases, untied output layer; ``moe=True`` swaps the MLP for 4
  experts at top-2 with the allgather dispatcher).
* ``seed_full_params`` makes initialisation independent of the layout. Megatron's
  CPU initialisation draws every tensor from one generator in construction order,
  and under PP a stage constructs only its layers, so PP2 and PP1 would start from
  different weights. Here each parameter's *full* tensor is drawn from a seed
  derived from its global name (global layer number, global expert id), then the
  local shard is sliced the way Megatron shards it.
* ``train`` runs SGD steps through ``get_forward_backward_func`` with Megatron's
  DistributedDataParallel and ``finalize_model_grads`` (DP, SP-norm and pipeline
  embedding reductions, as in real training) and returns the global-batch losses.
"""
from __future__ import annotations

import re
import zlib

import torch

from tools.smoke import SEQ, VOCAB, build_gpt, make_batches, train, wrap_ddp  # noqa: F401


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def global_name(model, name):
    """Local parameter name -> the same name with global layer and expert ids."""
    from megatron_mole.runtime import hybrid

    if hybrid.is_hybrid_stack(model.decoder):  # the equivalent GPTModel's name (same seeds)
        return global_name_experts(model, hybrid.gpt_parameter_name(name, model))
    match = _LAYER.search(name)
    if match:
        layer = model.decoder.layers[int(match.group(2))]
        name = name[: match.start(2)] + str(layer.layer_number - 1) + name[match.end(2) :]
    return global_name_experts(model, name)


def global_name_experts(model, name):
    """``name`` with global expert ids."""
    from megatron.core import parallel_state as ps

    match = _EXPERT.search(name)
    if match:
        num_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        expert = int(match.group(1)) + ps.get_expert_model_parallel_rank() * num_local
        name = name[: match.start(1)] + str(expert) + name[match.end(1) :]
    return name


def _tp_group_of(param):
    """(size, rank) of the group that splits ``param``: expert weights follow the
    expert tensor-parallel group, the rest the tensor-parallel group."""
    from megatron.core import parallel_state as ps

    if getattr(param, "allreduce", True):
        return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()


def local_shard(param, full, name, gated=False):
    """Slice ``full`` the way Megatron shards ``param`` on this rank."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, rank = _tp_group_of(param)
    dim = param.partition_dim
    if gated and name.endswith("linear_fc1.weight"):
        # SwiGLU fc1 is [gate; up]; each rank holds [gate_r; up_r].
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2, 0)], 0)
    return full.chunk(size, dim)[rank]


def full_shape(param):
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp_group_of(param)[0]
    return shape


def seed_full_params(model, seed=0, std=0.02):
    gated = model.config.gated_linear_unit
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(model, name)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(gname.encode()))
            shape = full_shape(param)
            if param.dim() == 1:  # norm weights
                full = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                full = std * torch.randn(shape, generator=gen)
            param.copy_(local_shard(param, full, name, gated))


