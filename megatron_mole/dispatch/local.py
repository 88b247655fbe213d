"""Local token dispatch: sort (token, slot) assignments by expert once, combine once.

Rows are *slot-major*: the sort key of assignment (token t, slot j) is
``j * E + expert``, so the K * T sorted rows hold K blocks of T rows, block j
being every token's j-th choice sorted by expert (a stable argsort keeps token
order inside an expert). Groups are (slot, expert) pairs, ``counts_G`` has
K * E entries and group g uses expert g % E. At K = 1 this is the plain sort by
expert; for any K, block 0 is a permutation of all tokens, which the MLP scope
uses to run the frozen MLP once per token in sorted order and to un-permute
once at the output (layers/mole_mlp.py).

One code path for every K (K = E included), no per-expert masks: one argsort,
one bincount (the only host sync: segment sizes), one gather in, one gather
(by the inverse permutation) plus a sum over K out, or one scatter-add onto an
existing output (``combine_add``). An expert with no tokens is
simply an empty group.

The dispatcher is a seam: layers only call ``permute`` and ``combine``; the
expert-parallel all-to-all dispatcher provides the same two methods.

Legend: T tokens, K top-k slots, E experts, G = K * E groups, S = K * T rows,
D features.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class DispatchPlan:
    num_tokens: int
    top_k: int
    num_experts: int
    tok_S: torch.Tensor       # token id of each sorted row
    row_of_KT: torch.Tensor   # sorted row holding (slot j, token t)
    counts_G: List[int]       # rows per (slot, expert) group, host ints

    def block0_position(self, rows_S: torch.Tensor) -> torch.Tensor:
        """For sorted rows, the row of the same token in block 0 (its first choice)."""
        return self.row_of_KT[0].index_select(0, self.tok_S.index_select(0, rows_S))


class LocalDispatcher:
    """All experts live on this rank."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def permute(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                gates_TK: Optional[torch.Tensor] = None):
        """-> (x_SD, gates_S or None, plan)."""
        num_tokens, top_k = expert_idx_TK.shape
        if x_TD.shape[0] != num_tokens:
            raise ValueError(f"permute: x_TD has {x_TD.shape[0]} rows, expert_idx_TK {num_tokens}")
        slot_K1 = torch.arange(top_k, device=expert_idx_TK.device)[:, None]
        key_S = (slot_K1 * self.num_experts + expert_idx_TK.t()).reshape(-1)
        order_S = torch.argsort(key_S, stable=True)
        tok_S = order_S % num_tokens if top_k > 1 else order_S
        row_of_S = torch.empty_like(order_S)
        row_of_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        counts_G = torch.bincount(key_S, minlength=top_k * self.num_experts).tolist()
        plan = DispatchPlan(num_tokens, top_k, self.num_experts, tok_S,
                            row_of_S.view(top_k, num_tokens), counts_G)
        gates_S = None
        if gates_TK is not None:
            gates_S = gates_TK.t().reshape(-1).index_select(0, order_S)
        return x_TD.index_select(0, tok_S), gates_S, plan

    def combine(self, y_SD: torch.Tensor, plan: DispatchPlan,
                weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y_TD[t] = sum_j weights_TK[t, j] * y_SD[row of (j, t)] (weights default 1)."""
        y_KTD = y_SD.index_select(0, plan.row_of_KT.reshape(-1)).view(
            plan.top_k, plan.num_tokens, y_SD.shape[-1])
        if weights_TK is not None:
            y_KTD = y_KTD * weights_TK.t().unsqueeze(-1).to(y_KTD.dtype)
        return y_KTD[0] if plan.top_k == 1 else y_KTD.sum(0)

    def combine_add(self, out_TD: torch.Tensor, y_SD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """``out_TD + combine(y_SD)`` as one scatter-add (no [K*T, D] gather and
        no separate sum): for adding expert outputs to a base layer's output.
        Out of place: Megatron's linears may return views of their autograd
        Functions' outputs, which must not be modified in place. Optional for
        other dispatchers."""
        return out_TD.index_add(0, plan.tok_S, y_SD)
