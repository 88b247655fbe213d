"""Expert-parallel token dispatch by all-to-all, with only torch.distributed collectives.

Each rank of the expert-parallel group owns ``E_local = E / ep`` experts (global id
= local id + ep_rank * E_local). ``permute`` takes this rank's tokens and their
top-k choices and returns, on every rank, the rows routed to *its* experts grouped
by local expert; ``combine`` sends expert outputs back and sums them per token.
The same two methods as :class:`~megatron_mole.dispatch.local.LocalDispatcher`,
so layers do not know which one they use.

Steps (forward; backward mirrors each one, being made of autograd functions):
  1. sort the T·K (token, slot) assignments by global expert (one stable argsort):
     rows bound for rank r are then contiguous, ordered by expert;
  2. exchange the per-expert counts (one small ``all_to_all_single``) and read
     them on the host: the dispatch's one device -> host transfer (counts come
     from a search over the sorted keys, not ``bincount``, which syncs on GPUs);
  3. exchange the rows with uneven splits (``all_to_all_single``; gloo and nccl);
  4. received rows are grouped (source rank, local expert): one gather regroups
     them by local expert for the grouped matmul;
  ``combine`` undoes 4, 3 and 1 and sums the K slots of each token, weighted.

Dropless by default. With ``capacity_factor`` set, each expert keeps at most
``ceil(capacity_factor * T * K / E)`` rows *per source rank* (decided locally,
no extra communication): the assignments of an over-full expert are dropped
in order of ascending gate (lowest-probability choices first; ties keep the
earlier (slot, token)), and a dropped assignment contributes nothing to its token (its slot
output is zero). A rank with no tokens, an expert with no rows, or every token
on one expert all work: empty splits are legal in all_to_all_single.

Legend: T tokens, K top-k slots, E experts (global), L = E_local, S rows after
dispatch on this rank, D features, P ep size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward sends the gradient back."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_to_all(dy.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


# Bytes this process sent to other ranks through all_to_all (benchmarks read it).
TRAFFIC = {"bytes": 0}


def _all_to_all(x, out_splits: List[int], in_splits: List[int], group):
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    if dist.get_world_size(group) == 1:
        out.copy_(x)
        return out
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    remote_rows = sum(in_splits) - in_splits[dist.get_rank(group)]
    TRAFFIC["bytes"] += remote_rows * (x.numel() // max(x.shape[0], 1)) * x.element_size()
    return out


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0 (splits are host ints)."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def group_counts(sorted_key: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group 0..num_groups-1 of ascending keys (keys >= num_groups are not
    counted), on the keys' device: a search, no host sync (bincount syncs on GPUs)."""
    bounds = torch.searchsorted(sorted_key, torch.arange(num_groups + 1, device=sorted_key.device,
                                                         dtype=sorted_key.dtype))
    return bounds[1:] - bounds[:-1]


def regroup_index(counts_PL: List[List[int]], device=None) -> torch.Tensor:
    """Index that reorders rows laid out (source p, expert l)-major into
    (expert l, source p)-major, given the rows per (p, l) as host ints (no sync)."""
    total = sum(map(sum, counts_PL))
    counts = torch.tensor(counts_PL, dtype=torch.int64, device=device)
    flat = counts.reshape(-1)
    src_starts = (torch.cumsum(flat, 0) - flat).view_as(counts)
    lp_counts = counts.t().reshape(-1)
    lp_starts = src_starts.t().reshape(-1)
    offsets = torch.arange(total, device=device) - torch.repeat_interleave(
        torch.cumsum(lp_counts, 0) - lp_counts, lp_counts, output_size=total
    )
    return torch.repeat_interleave(lp_starts, lp_counts, output_size=total) + offsets


def ungroup(rows: torch.Tensor, regroup: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rows_grouped = rows_src.index_select(0, regroup)``."""
    return torch.zeros_like(rows).index_copy(0, regroup, rows)


@dataclass
class AllToAllPlan:
    num_tokens: int
    top_k: int
    order_A: torch.Tensor        # sorted assignment -> (slot, token) flat index j*T + t
    kept_A: Optional[torch.Tensor]  # bool per sorted assignment (None: dropless)
    send_splits: List[int]       # rows sent to each ep rank
    recv_splits: List[int]       # rows received from each ep rank
    regroup_S: torch.Tensor      # received row feeding each expert-grouped row
    counts_G: List[int]          # rows per local expert (grouped matmul segments)
    peer_counts: Optional[List[List[int]]] = None  # rows per local expert of each TP peer (TP split)
    dropped_fraction: Optional[torch.Tensor] = None  # of the used assignments, by capacity (device)

    @property
    def num_rows(self) -> int:
        return sum(self.counts_G)


class AllToAllDispatcher:
    """Dispatch to the experts of an expert-parallel group (see module docstring)."""

    def __init__(self, num_experts: int, group=None, capacity_factor: Optional[float] = None):
        self.group = group
        self.ep_size = dist.get_world_size(group) if dist.is_initialized() else 1
        self.ep_rank = dist.get_rank(group) if dist.is_initialized() else 0
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size {self.ep_size}"
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None; got {capacity_factor!r}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.capacity_factor = capacity_factor

    def _keep_mask(self, expert_A, gates_A, num_assignments):
        """Capacity drop: per expert keep the highest-gate rows up to capacity."""
        capacity = math.ceil(self.capacity_factor * num_assignments / self.num_experts)
        # rank of each assignment inside its expert by descending gate (stable on ties)
        by_gate = torch.argsort(-gates_A.detach().float(), stable=True)
        by_expert = by_gate[torch.argsort(expert_A[by_gate], stable=True)]
        counts_E = group_counts(expert_A[by_expert], self.num_experts + 1)  # + unused slots
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        position = torch.empty_like(expert_A)
        position[by_expert] = torch.arange(expert_A.numel(), device=expert_A.device) - torch.repeat_interleave(
            starts_E, counts_E, output_size=expert_A.numel()
        )
        return position < capacity

    def permute(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, gates_TK: Optional[torch.Tensor] = None,
                valid_TK: Optional[torch.Tensor] = None, tp_group=None):
        """-> (x_SD, gates_S or None, plan): rows for this rank's experts, by local expert.
        ``tp_group``: the TP ranks splitting this dispatch (dispatch/tp_split.py): their
        per-expert counts come with the same host transfer (``plan.peer_counts``).

        ``gates_TK`` may carry channels ([T, K, C]; capacity drops rank by channel 0):
        they reach the expert rank as ``gates_S`` [S, C]. ``valid_TK`` False: an
        unused slot (variable experts per token), never sent, adds 0."""
        num_tokens, top_k = expert_idx_TK.shape
        if x_TD.shape[0] != num_tokens:
            raise ValueError(f"permute: x_TD has {x_TD.shape[0]} rows, expert_idx_TK {num_tokens}")
        expert_A = expert_idx_TK.t().reshape(-1)  # slot-major flat j*T + t
        if valid_TK is not None:  # unused slots sort past every expert, like dropped ones
            expert_A = torch.where(valid_TK.t().reshape(-1), expert_A, torch.full_like(expert_A, self.num_experts))
        kept_A = dropped_fraction = None
        if self.capacity_factor is not None and gates_TK is not None:
            first_channel_TK = gates_TK if gates_TK.dim() == 2 else gates_TK[..., 0]
            keep = self._keep_mask(expert_A, first_channel_TK.t().reshape(-1), expert_A.numel())
            kept_A = keep
            used_A = expert_A < self.num_experts
            dropped_fraction = (used_A & ~keep).sum() / used_A.sum().clamp(min=1)
            # dropped assignments sort past every expert and are never sent
            expert_A = torch.where(keep, expert_A, torch.full_like(expert_A, self.num_experts))
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = group_counts(expert_A.index_select(0, order_A), self.num_experts)
        # 2. counts: [P, L] sent -> [P, L] received (one tiny all-to-all); with a TP
        # split, the TP peers' received counts too (one tiny all-gather); then the
        # dispatch's one device -> host transfer
        recv_counts = torch.empty_like(counts_E)
        if self.ep_size > 1:
            dist.all_to_all_single(recv_counts, counts_E, group=self.group)
        else:
            recv_counts.copy_(counts_E)
        fetch = [counts_E, recv_counts]
        if tp_group is not None:
            peers = [torch.empty_like(recv_counts) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(peers, recv_counts, group=tp_group)
            fetch += peers
        host = torch.cat(fetch).view(len(fetch), self.ep_size, self.num_local).tolist()
        counts_PL, recv_counts_PL = host[0], host[1]
        send_splits = [sum(row) for row in counts_PL]
        recv_splits = [sum(row) for row in recv_counts_PL]
        # 4. received rows are (source, local expert)-major; regroup by local expert
        regroup_S = regroup_index(recv_counts_PL, x_TD.device)
        counts_G = [sum(col) for col in zip(*recv_counts_PL)]
        peer_counts = [[sum(col) for col in zip(*peer)] for peer in host[2:]] or None
        num_sent = sum(send_splits)
        sent_A = order_A[:num_sent]
        tok_A = sent_A % num_tokens if top_k > 1 else sent_A
        plan = AllToAllPlan(num_tokens, top_k, order_A, kept_A, send_splits, recv_splits, regroup_S, counts_G,
                            peer_counts, dropped_fraction)
        x_SD = all_to_all(x_TD.index_select(0, tok_A), recv_splits, send_splits, self.group)
        x_SD = x_SD.index_select(0, regroup_S)
        gates_S = None
        if gates_TK is not None:
            # [T, K] or [T, K, C]: C gate channels travel with their row
            channels = tuple(gates_TK.shape[2:])
            width = math.prod(channels)
            gates_A = gates_TK.transpose(0, 1).reshape(num_tokens * top_k, width).index_select(0, sent_A)
            gates_S = all_to_all(gates_A, recv_splits, send_splits, self.group)
            gates_S = gates_S.index_select(0, regroup_S).view(-1, *channels)
        return x_SD, gates_S, plan

    def combine(self, y_SD: torch.Tensor, plan: AllToAllPlan, weights_TK: Optional[torch.Tensor] = None):
        """y_TD[t] = sum_j weights_TK[t, j] * (expert output of (t, j)); dropped slots add 0."""
        # undo the regroup: scatter rows back to (source, local expert) order
        y_recv = ungroup(y_SD, plan.regroup_S)
        y_sent = all_to_all(y_recv, plan.send_splits, plan.recv_splits, self.group)
        num_slots = plan.num_tokens * plan.top_k
        width = y_SD.shape[-1]
        sent_A = plan.order_A[: y_sent.shape[0]]
        y_KTD = y_sent.new_zeros(num_slots, width).index_copy(0, sent_A, y_sent)
        y_KTD = y_KTD.view(plan.top_k, plan.num_tokens, width)
        if weights_TK is not None:
            y_KTD = y_KTD * weights_TK.t().unsqueeze(-1).to(y_KTD.dtype)
        return y_KTD[0] if plan.top_k == 1 else y_KTD.sum(0)

    def combine_add(self, out_TD: torch.Tensor, y_SD: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        """``out_TD + combine(y_SD)`` (out of place, as LocalDispatcher.combine_add)."""
        return out_TD + self.combine(y_SD, plan).to(out_TD.dtype)
