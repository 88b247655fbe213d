"""All-to-all expert dispatch equals a plain per-token loop over all experts.

Every rank holds different tokens; experts are per-expert linear maps W_e. The
reference computes y_t = sum_j w_tj * W_{e_tj} x_t for the tokens of *all* ranks
in plain PyTorch, so the gradient of each W_e sums every rank's tokens, exactly
what the expert's owner must receive through the reverse all-to-all.
"""
from tests._dist import run_distributed

E, D = 8, 6
CASES = [
    dict(name="random-top2", top_k=2, tokens=[5, 7, 3, 6]),
    dict(name="top1", top_k=1, tokens=[9, 4, 4, 1]),
    dict(name="all-on-expert-3", top_k=1, tokens=[6, 6, 6, 6], expert=3),
    dict(name="one-rank-empty", top_k=2, tokens=[5, 0, 7, 2]),
    dict(name="top-k-equals-E", top_k=E, tokens=[3, 2, 4, 1]),
    dict(name="capacity-drops", top_k=2, tokens=[8, 8, 8, 8], capacity=0.5, expert=2),
]


def _inputs(case, rank, world):
    import torch

    gen = torch.Generator().manual_seed(100 + rank)
    t = case["tokens"][rank]
    x = torch.randn(t, D, generator=gen, dtype=torch.float64)
    logits = torch.randn(t, E, generator=gen, dtype=torch.float64)
    if "expert" in case:
        logits[:, case["expert"]] += 100.0
    probs = logits.softmax(-1)
    gates, idx = probs.topk(case["top_k"], dim=-1)
    return x, gates, idx


def _reference_keep(case, idx, gates):
    """Capacity rule, written as a per-expert loop: keep the highest-gate rows."""
    import math

    import torch

    if "capacity" not in case:
        return torch.ones_like(idx, dtype=torch.bool)
    t, k = idx.shape
    cap = math.ceil(case["capacity"] * t * k / E)
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for e in range(E):
        slots = [(j, i) for j in range(k) for i in range(t) if idx[i, j] == e]  # slot-major order
        slots.sort(key=lambda ji: -gates[ji[1], ji[0]].item())  # stable: ties keep order
        for j, i in slots[:cap]:
            keep[i, j] = True
    return keep


def _body():
    return [f for ep in (2, 4) for f in _check(ep)]


def _check(ep):
    import torch
    import torch.distributed as dist

    from megatron_mole.dispatch.alltoall import AllToAllDispatcher
    from megatron_mole.experts.grouped import grouped_linear

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    group = groups[rank // ep]
    ep_rank, local = rank % ep, E // ep
    w_full = torch.randn(E, D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    failures = []
    for case in CASES:
        x, gates, idx = _inputs(case, rank, world)
        x.requires_grad_(True)
        gates.requires_grad_(True)
        w_local = w_full[ep_rank * local:(ep_rank + 1) * local].clone().requires_grad_(True)
        disp = AllToAllDispatcher(E, group=group, capacity_factor=case.get("capacity"))
        x_S, gates_S, plan = disp.permute(x, idx, gates)
        if "capacity" in case:  # the logged statistic: this rank's assignments dropped
            dropped = 1.0 - _reference_keep(case, idx, gates.detach()).float().mean().item()
            if abs(float(plan.dropped_fraction) - dropped) > 1e-12:
                failures.append(f"ep={ep} {case['name']} dropped_fraction {float(plan.dropped_fraction)} != {dropped}")
        y_S = grouped_linear(x_S * gates_S.unsqueeze(-1), w_local, plan.counts_G)
        y = disp.combine(y_S, plan)
        if y.requires_grad:  # False on a rank with no tokens
            (y * torch.arange(1, D + 1, dtype=y.dtype)).sum().backward()
        # reference: all tokens of the EP group, every expert, plain loops
        w_ref = w_full.clone().requires_grad_(True)
        mine = None
        for src in range(rank - ep_rank, rank - ep_rank + ep):
            xs, gs, ids = _inputs(case, src, world)
            xs.requires_grad_(True)
            gs.requires_grad_(True)
            keep = _reference_keep(case, ids, gs)
            out = torch.zeros_like(xs)
            for i in range(xs.shape[0]):
                for j in range(ids.shape[1]):
                    if keep[i, j]:
                        out[i] = out[i] + w_ref[ids[i, j]] @ (xs[i] * gs[i, j])
            if out.requires_grad:
                (out * torch.arange(1, D + 1, dtype=out.dtype)).sum().backward()
            if src == rank:
                mine = (out.detach(), xs.grad, gs.grad)
        checks = {
            "y": (y.detach(), mine[0]),
            "dx": (x.grad, mine[1]),
            "dgates": (gates.grad, mine[2]),
            "dw": (w_local.grad, w_ref.grad[ep_rank * local:(ep_rank + 1) * local]),
        }
        for what, (got, ref) in checks.items():
            got = torch.zeros_like(ref) if got is None else got
            ref = torch.zeros_like(got) if ref is None else ref
            if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-10, rtol=1e-10):
                failures.append(f"ep={ep} {case['name']} {what}: max diff "
                                f"{(got - ref).abs().max().item() if got.shape == ref.shape else 'shape'}")
    return failures


def test_alltoall_dispatch_matches_per_token_loop():
    for failures in run_distributed(_body, 4):
        assert failures == []
