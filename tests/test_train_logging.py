"""Training logs over a long run: memory stays flat.

The per-step path of the training loop's logging, driven directly for thousands of steps
(no Megatron step): router hooks counting expert loads (``RouterLoadMonitor``), the
aux-loss tracker, ``gather_router_stats``, a step record of the loop's shape for 4 layers
x 8 experts, ``TrainResult.records`` and rank 0's JSON lines log. Python allocations
(tracemalloc) after a warm-up must not grow with the number of steps.
"""
import json
import tracemalloc
from types import SimpleNamespace

import torch

from megatron_mole.config import MoLEConfig
from megatron_mole.routing import AUX_LOSS_TRACKER, build_router
from megatron_mole.training.logging import RECORDS_KEPT, RouterLoadMonitor, StepLogger, gather_router_stats, \
    weighted_aux_loss
from megatron_mole.training.loop import TrainResult

LAYERS, EXPERTS = 4, 8


def test_logging_memory_stays_flat_over_many_steps(tmp_path):
    cfg = MoLEConfig(num_experts=EXPERTS, rank=2, top_k=2, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    routers = {f"decoder.layers.{i}.mlp": build_router(16, cfg) for i in range(LAYERS)}
    monitor = RouterLoadMonitor(torch.nn.Module())  # no wrappers: hook the routers directly
    for layer, router in routers.items():
        torch.nn.init.normal_(router.weight)
        router.register_forward_hook(monitor.counting_hook(layer, EXPERTS), with_kwargs=True)
    log = tmp_path / "train.jsonl"
    logger = StepLogger(SimpleNamespace(logging=SimpleNamespace(progress=False, log_jsonl=str(log),
                                                                tensorboard_dir=None)),
                        rank=0, start_step=0, max_steps=10 ** 6)
    result = TrainResult()
    x_TD = torch.randn(32, 16)

    def step(n):
        for layer, router in routers.items():
            AUX_LOSS_TRACKER.record(layer, router(x_TD).stats)
        aux, load = gather_router_stats(monitor)
        record = {"step": n, "loss": 1.0 / n, "domain_loss": {"a": 1.0, "b": 2.0}, "aux": aux,
                  "aux_loss": weighted_aux_loss(aux, cfg), "expert_load": load, "lr": 1e-4, "grad_norm": 0.5,
                  "tokens": 2048, "supervised_tokens": 300, "tokens_per_s": 1000.0, "step_time_s": 1.0}
        result.records.append(record)
        logger.log(record)

    with torch.no_grad():
        tracemalloc.start()  # tracks what is allocated from here on
        for n in range(1, 51):  # warm-up: caches, the records container filling up (with tracked records)
            step(n)
        before = tracemalloc.take_snapshot()
        for n in range(51, 351):
            step(n)
        growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
        tracemalloc.stop()
    logger.close()
    # a list of every record grows by ~1 MB over these 300 steps; allow noise only
    assert growth < 64 * 1024, growth
    assert len(result.records) == RECORDS_KEPT and result.records[-1]["step"] == 350
    assert result.records[0]["step"] == 350 - RECORDS_KEPT + 1
    lines = log.read_text().splitlines()
    assert len(lines) == 350 and json.loads(lines[-1])["expert_load"].keys() == routers.keys()
