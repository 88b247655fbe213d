"""The one dispatch seam of a MoLE unit: route -> ``permute`` -> expert block -> ``combine``.

:class:`ExpertDispatch` hides where experts live (every expert here, or sharded
over the expert-parallel group and reached by all-to-all) and, under expert
parallelism with tensor parallelism, the split of the dispatch over the TP
ranks that hold the same tokens (dispatch/tp_split.py). Wrappers call
``permute`` with the router's :class:`~megatron_mole.routing.Routing` (variable
experts per token included), run their expert block on the returned rows with
``handle.counts`` as grouped-matmul segments, and ``combine`` (or
``combine_add`` onto a base output); they never read the plan.

``tp_split``: the unit's TP ranks hold the same tokens (an MLP input, a
column-parallel linear's input) and split the dispatch; ``out_sharded``: the
expert block's output rows are this TP rank's out-shard (column-parallel
linear) rather than complete rows (after a row-parallel reduce).

Legend: T tokens, K slots, S rows reaching this rank's experts, D features,
C gate channels.
"""
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from megatron_mole.dispatch.local import LocalDispatcher
from megatron_mole.dispatch.sharding import ExpertSharding


@dataclass
class DispatchHandle:
    """What ``combine`` needs; ``counts`` are the rows per local expert group
    (host ints) for the grouped matmul; ``plan`` belongs to the dispatcher."""
    plan: Any
    counts: List[int]
    num_tokens: int
    undo: Any = None

    @property
    def stats(self) -> dict:
        """Dispatch statistics for the training log (``dropped_fraction`` under a capacity)."""
        dropped = getattr(self.plan, "dropped_fraction", None)
        return {} if dropped is None else {"dropped_fraction": dropped.detach().float()}


class ExpertDispatch:
    def __init__(self, num_experts: int, sharding: ExpertSharding, placement, *, tp_split: bool,
                 out_sharded: bool, capacity_factor: Optional[float] = None):
        self.sharding = sharding
        self.out_sharded = out_sharded
        self.split = None
        if sharding.size > 1:
            from megatron_mole.dispatch.alltoall import AllToAllDispatcher
            from megatron_mole.dispatch.tp_split import TokenSplit

            self.inner = AllToAllDispatcher(num_experts, sharding.group, capacity_factor)
            if tp_split and placement.tp_size > 1:
                self.split = TokenSplit(placement.group)
        else:
            self.inner = LocalDispatcher(num_experts)

    @property
    def expert_parallel(self) -> bool:
        return self.sharding.size > 1

    @property
    def local(self) -> bool:
        """Every expert on this rank (the sorted-rows plan of dispatch/local.py)."""
        return isinstance(self.inner, LocalDispatcher)

    def permute(self, x_TD: torch.Tensor, routing, gates_TKC: Optional[torch.Tensor] = None):
        """-> (x_SD, gates_SC, handle). Gates default to the routing's used gates;
        ``gates_TKC`` sends other per-slot channels instead ([T, K] or [T, K, C])."""
        idx_TK, valid_TK = routing.expert_idx_TK, routing.valid_TK
        gates = routing.masked_gates() if gates_TKC is None else gates_TKC
        num_tokens = x_TD.shape[0]
        if self.split is not None:
            _, start, stop = self.split.bounds(num_tokens)
            x_TD, gates = self.split.take_chunk(x_TD), self.split.take_chunk(gates)
            idx_TK = idx_TK[start:stop]
            valid_TK = None if valid_TK is None else valid_TK[start:stop]
        if self.split is None:
            x_SD, gates_S, plan = self.inner.permute(x_TD, idx_TK, gates, valid_TK)
            return x_SD, gates_S, DispatchHandle(plan, plan.counts_G, num_tokens)
        x_SD, gates_S, plan = self.inner.permute(x_TD, idx_TK, gates, valid_TK, tp_group=self.split.group)
        # every TP peer of the expert runs its shard on all their rows
        (x_SD, gates_S), counts, undo = self.split.gather_rows(plan.peer_counts, x_SD, gates_S)
        return x_SD, gates_S, DispatchHandle(plan, counts, num_tokens, undo)

    def combine(self, y_SD: torch.Tensor, handle: DispatchHandle, into: Optional[torch.Tensor] = None):
        """Sum each token's expert rows (unused and dropped slots add 0); added to
        ``into`` (a base output; by one scatter-add when the dispatcher can)."""
        if self.split is not None:
            from megatron_mole.dispatch.tp_split import rows_to_shards, shards_to_rows

            if self.out_sharded:  # peers' out-shards -> own rows -> this rank's shard of every token
                rows = shards_to_rows(y_SD, handle.undo, self.split)
                y_TD = rows_to_shards(self.inner.combine(rows, handle.plan), handle.num_tokens, self.split)
            else:
                y_chunk = self.inner.combine(self.split.own_rows(y_SD, handle.undo), handle.plan)
                y_TD = self.split.gather_tokens(y_chunk, handle.num_tokens)
            return y_TD if into is None else into + y_TD.to(into.dtype)
        if into is None:
            return self.inner.combine(y_SD, handle.plan)
        return self.inner.combine_add(into, y_SD, handle.plan)


def build_dispatch(cfg, sharding: ExpertSharding, placement, *, tp_split: bool, out_sharded: bool) -> ExpertDispatch:
    return ExpertDispatch(cfg.num_experts, sharding, placement, tp_split=tp_split, out_sharded=out_sharded,
                          capacity_factor=cfg.capacity_factor)
