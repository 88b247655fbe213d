"""Choosing between all-to-all expert parallelism and replicated LoRA experts.

LoRA experts are small: an expert of rank r on a d_in x d_out linear has
r (d_in + d_out) parameters, while dispatching a token sends its d_in-wide
activation out and a d_out-wide result back (and the same again in backward).
So holding every expert on every rank ("replicated") can move fewer bytes than
all-to-all, and it always removes the dispatch latency; all-to-all wins when
experts are many or wide, or when their optimizer state does not fit.

Per step and per rank, for one adapted linear (or one MLP in scope "mlp"):

* all-to-all: every (token, slot) row whose expert lives elsewhere crosses the
  wire four times (activation out and result back, forward and backward):
  ``rows * (ep - 1) / ep * 2 * (d_in + d_out) * act_bytes``; the expert grads
  are then all-reduced over the expert-data-parallel group (dp / ep ranks) for
  ``E / ep`` experts.
* replicated: no dispatch; the grads of all ``E`` experts are all-reduced over
  the data-parallel group.

A ring all-reduce of n bytes over g ranks moves ``2 (g - 1) / g * n`` bytes per
rank. Memory per rank: expert params + grads + Adam moments
(``param_bytes + grad_bytes + 8`` bytes per parameter, fp32 moments).

``choose_dispatch`` picks the mode with fewer bytes moved, unless the replicated
experts would exceed ``memory_budget_bytes`` (then all-to-all).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


def _allreduce_bytes(num_bytes: float, group_size: int) -> float:
    return 0.0 if group_size <= 1 else 2.0 * (group_size - 1) / group_size * num_bytes


@dataclass(frozen=True)
class DispatchCost:
    mode: str
    bytes_per_step: float
    bytes_per_token: float
    expert_state_bytes: float


def estimate(
    mode: str,
    tokens_per_rank: int,
    top_k: int,
    num_experts: int,
    rank: int,
    linears: Sequence[Tuple[int, int]],
    ep: int,
    dp: int,
    act_bytes: int = 4,
    param_bytes: int = 4,
    grad_bytes: int = 4,
    params_per_expert: Optional[int] = None,
) -> DispatchCost:
    """Bytes one rank moves per step for one MoLE unit (see module docstring).

    ``linears`` lists the (d_in, d_out) of the adapted linears of the unit: one for
    scope "linear", fc1 then fc2 for scope "mlp". Dispatch sends the first one's
    input and returns the last one's output (the MLP's input and output).
    ``dp`` is the data-parallel size of the dense part (world / (tp * pp)).
    ``params_per_expert``: from the adapter kind's spec (layers/specs.py); without
    it, a LoRA expert of ``rank`` on each linear.
    """
    if params_per_expert is None:
        params_per_expert = sum(rank * (d_in + d_out) for d_in, d_out in linears)
    d_send, d_back = linears[0][0], linears[-1][1]
    rows = tokens_per_rank * top_k
    if mode == "replicated":
        experts_here, reduce_group, wire = num_experts, dp, 0.0
    elif mode == "alltoall":
        if num_experts % ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep={ep}")
        experts_here, reduce_group = num_experts // ep, max(dp // ep, 1)
        wire = rows * (ep - 1) / ep * 2 * (d_send + d_back) * act_bytes
    else:
        raise ValueError(f"mode must be 'replicated' or 'alltoall'; got {mode!r}")
    grad_sync = _allreduce_bytes(experts_here * params_per_expert * grad_bytes, reduce_group)
    total = wire + grad_sync
    state = experts_here * params_per_expert * (param_bytes + grad_bytes + 8)
    return DispatchCost(mode, total, total / max(tokens_per_rank, 1), state)


def choose_dispatch(
    tokens_per_rank: int,
    top_k: int,
    num_experts: int,
    rank: int,
    linears: Sequence[Tuple[int, int]],
    ep: int,
    dp: int,
    memory_budget_bytes: Optional[float] = None,
    **bytes_kw,
) -> Tuple[str, DispatchCost, DispatchCost]:
    """-> (chosen mode, all-to-all cost, replicated cost). ep == 1 is always replicated."""
    args = (tokens_per_rank, top_k, num_experts, rank, linears, ep, dp)
    rep = estimate("replicated", *args, **bytes_kw)
    if ep == 1:
        return "replicated", rep, rep
    a2a = estimate("alltoall", *args, **bytes_kw)
    if memory_budget_bytes is not None and rep.expert_state_bytes > memory_budget_bytes:
        return "alltoall", a2a, rep
    return ("alltoall" if a2a.bytes_per_step < rep.bytes_per_step else "replicated"), a2a, rep
