"""`megatron-mole smoke`: a tiny Megatron GPT trained a few steps at any layout.

Run it under torchrun, e.g. ``torchrun --nproc-per-node 4 -m megatron_mole smoke --tp 2 --pp 2``:
it builds Megatron-core's own ``GPTModel`` from Megatron's own local layer spec
(RMSNorm, GQA, SwiGLU; ``--moe`` for 4 experts at top-2), wraps it in Megatron's
DistributedDataParallel and runs SGD steps through ``get_forward_backward_func``
with the global batch split over the data-parallel ranks. On a CPU box this
exercises the whole CPU runtime; on GPUs it runs unchanged with NCCL.

Legend: B batch, S sequence, V vocabulary.
"""
from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F

VOCAB = 128
SEQ = 16


def build_gpt(moe=False, sequence_parallel=False, vocab=VOCAB, seq=SEQ, num_layers=2, hybrid=False,
              attention="local", **overrides):
    """Megatron's GPTModel, or with ``hybrid`` its HybridModel of the same layers (pattern
    "*-" / "*E" per GPT layer, the same local layer spec; megatron-core >= 0.19).
    ``attention="sdpa"``: torch's fused core attention (runtime/attention.py)."""
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
        sequence_parallel=sequence_parallel,
    )
    if moe:
        # Megatron's config refuses expert parallelism without MoE layers; a dense model
        # at ep > 1 (MoLE experts sharded over EP) leaves these at 1.
        kwargs.update(
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        )
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
    if attention != "local":
        from megatron_mole.runtime.attention import resolve_attention, with_core_attention

        if resolve_attention(attention, config) == "sdpa":
            spec = with_core_attention(spec)
    if hybrid:
        import dataclasses

        from megatron_mole.runtime import compat
        from megatron_mole.runtime.hybrid import gpt_pattern

        pattern = gpt_pattern(num_layers, [moe] * num_layers, ps.get_pipeline_model_parallel_world_size())
        hybrid_config = dataclasses.replace(config, num_layers=2 * num_layers)
        model = compat.build_hybrid_model(
            hybrid_config, spec, pattern, vocab_size=vocab, max_sequence_length=seq,
            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=False, position_embedding_type="rope")
        return model, hybrid_config
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


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
    # clone: the schedule divides the returned loss in place by the micro-batch count
    return loss, {"loss": loss.detach().clone()}


def _gpt_forward_step(data_iterator, chunk):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0).expand_as(inputs)
    out = chunk(inputs, position_ids, None, labels=labels)
    return out, partial(loss_func, torch.ones_like(labels, dtype=torch.float32))


def train(model, config, batches, lr=0.5, micro_batch_size=1, after_step=None):
    """SGD on the global batches ``batches[step]`` [B, S+1]; returns the per-step mean losses.

    Each data-parallel rank takes its contiguous slice of the global batch and
    runs it as micro-batches of ``micro_batch_size``; ``after_step(model)`` runs
    after each update (e.g. ``megatron_mole.model.update_global_balance``).
    """
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()

    def prepare(global_batch):
        local = global_batch.chunk(dp, 0)[dp_rank]
        return list(local.split(micro_batch_size, 0)), local.shape[1] - 1, micro_batch_size

    return sgd_train(model, config, batches, prepare, _gpt_forward_step, lr, after_step)


def sgd_train(model, config, batches, prepare, forward_step, lr, after_step=None):
    """SGD through Megatron's schedule and DDP; returns the per-step mean losses (over micro-batches
    and DP ranks). ``prepare(global_batch)`` -> (this rank's micro-batches, schedule seq_length,
    micro-batch size); ``forward_step`` is the schedule's forward-step function."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp = wrap_ddp(model, config)
    params = [p for p in ddp.parameters() if p.requires_grad]
    forward_backward = get_forward_backward_func()
    losses = []
    for global_batch in batches:
        micro, seq_length, micro_batch_size = prepare(global_batch)
        ddp.zero_grad_buffer()
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=len(micro),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
        )
        with torch.no_grad():
            for p in params:
                p.add_(p.main_grad, alpha=-lr)
        if after_step is not None:
            after_step(model)
        losses.append(_global_mean_loss(reduced))
    return losses


def _global_mean_loss(reduced):
    """Mean loss over micro-batches and DP ranks, broadcast from the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mole.runtime import get_device

    value = torch.zeros(1, dtype=torch.float64, device=get_device())
    if ps.is_pipeline_last_stage():
        value += torch.stack([r["loss"] for r in reduced]).double().mean()
        dist.all_reduce(value, group=ps.get_data_parallel_group())
        value /= ps.get_data_parallel_world_size()
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
    return value.item()


def add_arguments(parser):
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--moe", action="store_true", help="4 experts, top-2 (allgather dispatcher)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1234)


def run(args):
    import megatron_mole as mm

    info = mm.init_distributed(tp=args.tp, pp=args.pp, ep=args.ep, device=args.device, seed=args.seed)
    model, config = build_gpt(moe=args.moe, sequence_parallel=args.sequence_parallel)
    model.to(info.device)
    batches = make_batches(1, args.global_batch).expand(args.steps, -1, -1).to(info.device)
    start = time.perf_counter()
    losses = train(model, config, batches, lr=args.lr)
    if info.rank == 0:
        print(
            f"smoke: world={info.world_size} tp={info.tp} pp={info.pp} ep={info.ep} dp={info.dp} "
            f"device={info.device.type} patches={len(info.patches)} "
            f"losses={[round(x, 4) for x in losses]} ({time.perf_counter() - start:.1f}s)"
        )
    if not losses[-1] < losses[0]:
        raise SystemExit(f"smoke: the loss did not decrease: {losses}")
    return 0
