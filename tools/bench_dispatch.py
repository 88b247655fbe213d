"""``megatron-mole bench dispatch``: all-to-all expert parallelism vs replicated experts.

Spawns ``--world`` local processes (gloo on CPU, NCCL on GPUs) and, for every EP
size that divides the world, times one training step of a MoLE MLP (Megatron's
own MLP wrapped by ``MoLEMLP``, expert_scope "mlp"): forward, backward and the
gradient reduction Megatron's DDP would do (replicated experts over the
data-parallel group; sharded experts over the expert-data-parallel group and the
router over data-parallel). Modes alternate inside each round so machine noise
hits both alike. It prints, per EP size and mode, the bytes one rank sends per
token (measured all-to-all traffic plus the all-reduce bytes of a ring), the
median step time, its ratio to the replicated mode of the same EP size, and the
mode the ``auto`` cost model (dispatch/cost.py) picks for these sizes.

Legend: T tokens per rank, H hidden, F ffn, E experts.
"""
from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.nn.functional as F


def add_arguments(parser):
    parser.add_argument("--world", type=int, default=4, help="processes to spawn")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")


def _grad_sync(wrapper, dp_group, expert_dp_group):
    """All-reduce grads as Megatron's DDP does; returns the ring bytes this rank sends."""
    import torch.distributed as dist

    sent = 0
    for t in wrapper.adapter_tensors():
        grad = t.param.grad
        group = dp_group if t.experts.size == 1 else expert_dp_group
        size = dist.get_world_size(group)
        if grad is None or size == 1:
            continue
        dist.all_reduce(grad, group=group)
        sent += 2 * (size - 1) / size * grad.numel() * grad.element_size()
    return sent


def _worker(args):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP

    import megatron_mole as mm
    from megatron_mole.runtime import compat
    from megatron_mole.dispatch import alltoall
    from megatron_mole.dispatch.cost import choose_dispatch
    from megatron_mole.layers.mole_mlp import MoLEMLP
    from megatron_mole.layers.base import mark_parallel_attributes
    from megatron_mole.runtime import set_model_parallel

    info = mm.init_distributed(device=args.device)
    torch.manual_seed(100 + info.rank)
    x = torch.randn(args.tokens, 1, args.hidden, device=info.device)
    tcfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                             num_attention_heads=8, gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=False, use_cpu_initialization=True,
                             params_dtype=torch.float32)
    spec = compat.local_mlp_submodules()
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    rows = []
    for ep in [e for e in (1, 2, 4, 8) if info.world_size % e == 0 and args.experts % e == 0]:
        set_model_parallel(ep=ep)
        modes = ["replicated"] + (["alltoall"] if ep > 1 else [])
        variants = {}
        for mode in modes:
            cfg = mm.MoLEConfig(num_experts=args.experts, rank=args.rank, top_k=args.top_k,
                                expert_scope="mlp", dispatch=mode, lora_b_init="random")
            base = MLP(tcfg, spec, ffn_hidden_size=args.ffn).to(info.device)
            for p in base.parameters():
                p.requires_grad_(False)
            wrapper = MoLEMLP(base, cfg)
            wrapper.init_adapters(cfg.seed)
            mark_parallel_attributes(wrapper)
            variants[mode] = wrapper.to(info.device)
        times = {m: [] for m in modes}
        traffic = {m: 0.0 for m in modes}
        dp_group = ps.get_data_parallel_group()
        edp_group = ps.get_expert_data_parallel_group()
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for mode in modes:
                wrapper = variants[mode]
                wrapper.zero_grad(set_to_none=True)
                dist.barrier()
                sync()
                alltoall.TRAFFIC["bytes"] = 0
                start = time.perf_counter()
                y = wrapper(x.detach().requires_grad_())[0]
                y.backward(torch.ones_like(y))
                sent = alltoall.TRAFFIC["bytes"] + _grad_sync(wrapper, dp_group, edp_group)
                sync()
                if round_:
                    times[mode].append(time.perf_counter() - start)
                    traffic[mode] = sent
        linears = [(args.hidden, 2 * args.ffn), (args.ffn, args.hidden)]
        choice = choose_dispatch(args.tokens, args.top_k, args.experts, args.rank, linears, ep,
                                 ps.get_data_parallel_world_size())[0]
        # slowest rank decides the step
        for mode in modes:
            # on the run's device: NCCL reduces only GPU tensors
            med = torch.tensor([statistics.median(times[mode]), traffic[mode]], dtype=torch.float64,
                               device=info.device)
            dist.all_reduce(med, op=dist.ReduceOp.MAX)
            rows.append((ep, mode, med[1].item() / args.tokens, med[0].item(), choice))
    if info.rank == 0:
        print(f"MoLE MLP H={args.hidden} F={args.ffn} E={args.experts} r={args.rank} top-{args.top_k}, "
              f"{args.tokens} tokens/rank, world {info.world_size} on {info.device.type}; "
              f"fwd+bwd+grad sync, median of {args.rounds}")
        print(f"  {'ep':>2}  {'mode':10}  {'bytes/token':>11}  {'step ms':>8}  {'vs replicated':>13}  auto picks")
        ref = {}
        for ep, mode, per_token, step, choice in rows:
            ref.setdefault(ep, step)
            print(f"  {ep:>2}  {mode:10}  {per_token:11.0f}  {step * 1000:8.1f}  {step / ref[ep]:12.2f}x  {choice}")
    return 0


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # share the CPU cores
    _worker(args)


def run(args):
    if "RANK" in os.environ:  # already under torchrun
        return _worker(args)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args), nprocs=args.world, join=True)
    return 0
