"""Tiny Megatron-core GPT models and a training loop for parity tests.

Legend: B batch, S sequence, V vocabulary.

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
import torch.nn.functional as F

VOCAB = 128
SEQ = 16


def build_gpt(moe=False, sequence_parallel=False, vocab=VOCAB, seq=SEQ, num_layers=2, **overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=num_layers,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=sequence_parallel,
    )
    if moe:
        kwargs.update(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=0.0,  # balance losses depend on the micro-batch split
            moe_grouped_gemm=False,
            moe_ffn_hidden_size=96,
        )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=seq,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model, config


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def global_name(model, name):
    """Local parameter name -> the same name with global layer and expert ids."""
    from megatron.core import parallel_state as ps

    match = _LAYER.search(name)
    if match:
        layer = model.decoder.layers[int(match.group(2))]
        name = name[: match.start(2)] + str(layer.layer_number - 1) + name[match.end(2) :]
    match = _EXPERT.search(name)
    if match:
        num_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        expert = int(match.group(1)) + ps.get_expert_model_parallel_rank() * num_local
        name = name[: match.start(1)] + str(expert) + name[match.end(1) :]
    return name


def local_shard(param, full, name, gated=False):
    """Slice ``full`` the way Megatron shards ``param`` on this rank."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full
    if getattr(param, "allreduce", True):
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    else:  # expert weights follow the expert tensor-parallel group
        size = ps.get_expert_tensor_parallel_world_size()
        rank = ps.get_expert_tensor_parallel_rank()
    dim = param.partition_dim
    if gated and name.endswith("linear_fc1.weight"):
        # SwiGLU fc1 is [gate; up]; each rank holds [gate_r; up_r].
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2, 0)], 0)
    return full.chunk(size, dim)[rank]


def full_shape(param):
    from megatron.core import parallel_state as ps

    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        expert = not getattr(param, "allreduce", True)
        size = (
            ps.get_expert_tensor_parallel_world_size()
            if expert
            else ps.get_tensor_model_parallel_world_size()
        )
        shape[param.partition_dim] *= size
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


def make_batches(steps, global_batch, seq=SEQ, vocab=VOCAB, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, global_batch, seq + 1), generator=gen)


def wrap_ddp(model, config):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    return ddp


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
    # clone: the schedule divides the returned loss in place by the micro-batch count
    return loss, {"loss": loss.detach().clone()}


def train(model, config, batches, lr=0.5, micro_batch_size=1, extra_loss=None):
    """SGD on the global batches ``batches[step]`` [B, S+1]; returns the per-step mean losses.

    Each data-parallel rank takes its contiguous slice of the global batch and
    runs it as micro-batches of ``micro_batch_size``.
    """
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ddp = wrap_ddp(model, config)
    params = [p for p in ddp.parameters() if p.requires_grad]
    forward_backward = get_forward_backward_func()
    losses = []
    for global_batch in batches:
        local = global_batch.chunk(dp, 0)[dp_rank]
        micro = list(local.split(micro_batch_size, 0))

        def forward_step(data_iterator, chunk):
            tokens = next(data_iterator)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            position_ids = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
            out = chunk(inputs, position_ids, None, labels=labels)
            return out, partial(_loss_func, torch.ones_like(labels, dtype=torch.float32))

        ddp.zero_grad_buffer()
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=len(micro),
            seq_length=local.shape[1] - 1,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        with torch.no_grad():
            for p in params:
                p.add_(p.main_grad, alpha=-lr)
        losses.append(_global_mean_loss(reduced))
    return losses


def _global_mean_loss(reduced):
    """Mean loss over micro-batches and DP ranks, broadcast from the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    value = torch.zeros(1, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        value += torch.stack([r["loss"] for r in reduced]).double().mean()
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value /= ps.get_data_parallel_world_size()
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
    return value.item()
