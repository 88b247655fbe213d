"""Megatron's DDP and optimizers over sharded MoLE experts, with and without the
distributed optimizer: the same SGD steps give the same adapters at EP1 and EP2/EP4.

Megatron's distributed optimizer supports only Adam, whose first steps are nearly
invariant to a constant gradient scale; so Adam runs in its linear regime
(beta1 = 0, eps = 1e3 far above |g|: update = lr * g / (|g| + eps) ~ g / 2), where
a wrongly scaled or wrongly reduced gradient changes the result.
"""
from tests._dist import run_distributed

RUNS = [
    dict(ep=1, distributed=False),
    dict(ep=2, distributed=False),
    dict(ep=2, distributed=True),
    dict(ep=4, distributed=True),
]
STEPS, GLOBAL_BATCH = 2, 4


def _train_with_megatron_optimizer(model, config, batches, distributed):
    from functools import partial

    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tools.smoke import loss_func

    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=500.0, adam_beta1=0.0, adam_eps=1e3, weight_decay=0.0,
                        clip_grad=0.0,
                        use_distributed_optimizer=distributed, params_dtype=torch.float32),
        [ddp],
    )
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for global_batch in batches:
        micro = list(global_batch.chunk(dp, 0)[dp_rank].split(1, 0))

        def forward_step(data_iterator, chunk):
            tokens = next(data_iterator)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            pos = torch.arange(inputs.shape[1]).unsqueeze(0)
            return chunk(inputs, pos, None, labels=labels), partial(loss_func, torch.ones_like(labels, dtype=torch.float32))

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                                    num_microbatches=len(micro), seq_length=micro[0].shape[1] - 1,
                                    micro_batch_size=1, forward_only=False)
        ok, _, _ = optimizer.step()
        assert ok


def _run():
    import megatron_mole as mm
    from megatron_mole.routing import set_aux_loss_scale
    from megatron_mole.runtime import set_model_parallel
    from tests import _models
    from tests.test_expert_parallel import _cfg

    mm.init_distributed(device="cpu", seed=1234)
    batches = _models.make_batches(STEPS, global_batch=GLOBAL_BATCH)
    results = []
    for run in RUNS:
        set_model_parallel(ep=run["ep"])
        model, config = _models.build_gpt()
        _models.seed_full_params(model, seed=3)
        mm.apply_mole(model, _cfg("mlp"))
        set_aux_loss_scale(4 / GLOBAL_BATCH)
        before = mm.adapter_state_dict(model)
        _train_with_megatron_optimizer(model, config, batches, run["distributed"])
        after = mm.adapter_state_dict(model)
        results.append({k: after[k] - before[k] for k in after})
    set_aux_loss_scale(None)
    reference = results[0]
    worst = []
    for run, updates in zip(RUNS[1:], results[1:]):
        diff = max(float((updates[k] - reference[k]).abs().max()) for k in reference)
        scale = max(float(reference[k].abs().max()) for k in reference)
        worst.append((str(run), diff / scale))
    moved = all(float(v.abs().max()) > 0 for k, v in reference.items() if "lora_b" in k)
    return worst, moved


def test_megatron_ddp_and_distributed_optimizer_over_expert_shards():
    for worst, moved in run_distributed(_run, 4, timeout=900):
        assert moved
        for run, rel in worst:
            assert rel <= 1e-5, (run, rel)
