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
one search for the group sizes and one device -> host transfer of them (the
only host sync: segment sizes), one gather in, one gather
(by the inverse permutation) plus a sum over K out, or one scatter-add onto an
existing output (``combine_add``). An expert with no tokens is
simply an empty group. A router may use fewer than K slots for a token
(``valid_TK``): unused slots sort past every group, get no row, and add 0.

The dispatcher is a seam: layers only call ``permute`` and ``combine``; the
expert-parallel all-to-all dispatcher provides the same two methods.

Legend: T tokens, K top-k slots, E experts, G = K * E groups, S = K * T rows,
D features.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_mole.dispatch.alltoall import group_counts


@dataclass
class DispatchPlan:
    num_tokens: int
    top_k: int
    num_experts: int
    tok_S: torch.Tensor       # token id of each sorted row
    row_of_KT: torch.Tensor   # sorted row holding (slot j, token t); S for an unused slot
    counts_G: List[int]       # rows per (slot, expert) group, host ints
    has_unused: bool = False  # some (slot, token) pairs are unused (variable experts per token)

    @property
    def num_rows(self) -> int:
        return self.tok_S.shape[0]

    @property
    def block_sizes(self) -> List[int]:
        """Rows of each slot's block (block 0 holds every token once)."""
        e = self.num_experts
        return [sum(self.counts_G[j * e:(j + 1) * e]) for j in range(self.top_k)]

    def block0_position(self, rows_S: torch.Tensor) -> torch.Tensor:
        """For sorted rows, the row of the same token in block 0 (its first choice)."""
        return self.row_of_KT[0].index_select(0, self.tok_S.index_select(0, rows_S))

    def per_row(self, values_T: torch.Tensor) -> torch.Tensor:
        """A per-token tensor repeated onto the sorted rows."""
        return values_T.index_select(0, self.tok_S)

    def unpermute_block0(self, y_TD: torch.Tensor) -> torch.Tensor:
        """Block-0 rows (one per token, expert-sorted) -> token order."""
        return y_TD.index_select(0, self.row_of_KT[0])


class LocalDispatcher:
    """All experts live on this rank."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def permute(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor,
                gates_TK: Optional[torch.Tensor] = None, valid_TK: Optional[torch.Tensor] = None):
        """-> (x_SD, gates_S or None, plan). ``valid_TK`` False: the slot is
        unused (no row); ``gates_TK`` may carry channels ([T, K, C])."""
        num_tokens, top_k = expert_idx_TK.shape
        if x_TD.shape[0] != num_tokens:
            raise ValueError(f"permute: x_TD has {x_TD.shape[0]} rows, expert_idx_TK {num_tokens}")
        num_groups = top_k * self.num_experts
        slot_K1 = torch.arange(top_k, device=expert_idx_TK.device)[:, None]
        key_KT = slot_K1 * self.num_experts + expert_idx_TK.t()
        if valid_TK is not None:  # unused slots sort past every group and get no row
            key_KT = torch.where(valid_TK.t(), key_KT, torch.full_like(key_KT, num_groups))
        key_S = key_KT.reshape(-1)
        order_S = torch.argsort(key_S, stable=True)
        counts_G = group_counts(key_S.index_select(0, order_S), num_groups).tolist()  # the one host sync
        num_rows = sum(counts_G) if valid_TK is not None else order_S.numel()
        row_of_S = torch.empty_like(order_S)
        row_of_S[order_S] = torch.arange(order_S.numel(), device=order_S.device).clamp_(max=num_rows)
        order_S = order_S[:num_rows]
        tok_S = order_S % num_tokens if top_k > 1 else order_S
        plan = DispatchPlan(num_tokens, top_k, self.num_experts, tok_S, row_of_S.view(top_k, num_tokens),
                            counts_G, num_rows < top_k * num_tokens)
        gates_S = None
        if gates_TK is not None:
            channels = tuple(gates_TK.shape[2:])
            gates_S = gates_TK.transpose(0, 1).reshape(num_tokens * top_k, *channels).index_select(0, order_S)
        return x_TD.index_select(0, tok_S), gates_S, plan

    def combine(self, y_SD: torch.Tensor, plan: DispatchPlan,
                weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y_TD[t] = sum_j weights_TK[t, j] * y_SD[row of (j, t)] (weights default 1;
        unused slots add 0)."""
        if plan.has_unused:  # unused slots point one past the rows: a zero row
            y_SD = torch.cat([y_SD, y_SD.new_zeros(1, y_SD.shape[-1])])
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
