"""Splitting expert-parallel dispatch over the tensor-parallel ranks that hold the same tokens.

In scope "mlp" every TP rank of a group holds the same tokens (the MLP input,
all-gathered under SP) and takes the same routing decisions. Without a split,
each of them would send every token to its expert-parallel peer. Instead TP
rank i dispatches only its chunk i of the tokens; the expert's TP peers
all-gather the rows they received (so all of them run their TP shard of the
expert on the same rows, and the TP collectives inside line up), keep the
outputs of their own rows for the return trip, and the home TP ranks all-gather
the returned token chunks. Each token crosses the EP group once.

Autograd pairs (the Megatron convention: a TP-replicated activation carries a
complete, identical gradient on every TP rank):

* ``take_chunk``: forward keeps this rank's chunk of a replicated tensor;
  backward all-reduces (other ranks contribute their chunks' gradients).
* ``gather_rows`` / ``own_rows``: variable-size all-gather of rows over TP
  (backward: this rank's rows of the identical gradient) and its inverse
  (forward: this rank's rows; backward: all-gather of the gradients).

Legend: T tokens, S rows received by one TP rank, A rows of all TP peers, L
local experts, P TP size.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from megatron_mole.dispatch.alltoall import regroup_index, ungroup


def _gather_variable(x: torch.Tensor, sizes: List[int], group) -> List[torch.Tensor]:
    """All-gather rows of different counts per rank (pad to the largest)."""
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded.contiguous(), group=group)
    return [p[:n] for p, n in zip(pieces, sizes)]


class _TakeChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start, stop, group):
        ctx.shape, ctx.start, ctx.stop, ctx.group = x.shape, start, stop, group
        return x[start:stop].clone()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[ctx.start:ctx.stop] = grad
        dist.all_reduce(full, group=ctx.group)
        return full, None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat(_gather_variable(x, sizes, group), 0)

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]].clone(), None, None, None


class _OwnRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        start = sum(sizes[:rank])
        return x[start:start + sizes[rank]].clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.cat(_gather_variable(grad.contiguous(), ctx.sizes, ctx.group), 0), None, None, None


class TokenSplit:
    """Chunk i of the tokens for TP rank i, and the collectives that undo it."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def bounds(self, num_tokens: int):
        base, extra = divmod(num_tokens, self.size)
        sizes = [base + (1 if r < extra else 0) for r in range(self.size)]
        start = sum(sizes[: self.rank])
        return sizes, start, start + sizes[self.rank]

    def take_chunk(self, x: torch.Tensor) -> torch.Tensor:
        _, start, stop = self.bounds(x.shape[0])
        return _TakeChunk.apply(x, start, stop, self.group)

    def gather_tokens(self, y_chunk: torch.Tensor, num_tokens: int) -> torch.Tensor:
        sizes, _, _ = self.bounds(num_tokens)
        return _GatherRows.apply(y_chunk, sizes, self.rank, self.group)

    def gather_rows(self, peer_counts: List[List[int]], *rows_S):
        """Rows of every TP peer, regrouped by local expert (peers' order inside an
        expert), for each of ``rows_S`` (tensors sharing this rank's per-expert
        counts); ``peer_counts`` [P][L]: every peer's rows per local expert, host ints
        (the dispatcher fetched them with its own counts). Returns ([gathered
        tensors], rows per expert, undo state)."""
        sizes = [sum(row) for row in peer_counts]
        regroup_A = regroup_index(peer_counts, rows_S[0].device)
        gathered = [_GatherRows.apply(x, sizes, self.rank, self.group).index_select(0, regroup_A)
                    for x in rows_S]
        return gathered, [sum(col) for col in zip(*peer_counts)], (regroup_A, sizes)

    def own_rows(self, y_AD: torch.Tensor, undo) -> torch.Tensor:
        """This rank's rows of expert-grouped ``y_AD``, in the order it received them."""
        regroup_A, sizes = undo
        return _OwnRows.apply(ungroup(y_AD, regroup_A), sizes, self.rank, self.group)


def shards_to_rows(y_AW: torch.Tensor, undo, split: "TokenSplit") -> torch.Tensor:
    """Column-parallel outputs: expert-grouped rows of all TP peers with this rank's
    out-shard [A, w] -> this rank's own rows with every peer's shard [S, P*w]
    (shards concatenated in rank order; ``rows_to_shards`` undoes it)."""
    from megatron_mole.dispatch.alltoall import all_to_all

    regroup_A, sizes = undo
    peer_major = ungroup(y_AW, regroup_A)
    mine = sizes[split.rank]
    got = all_to_all(peer_major, [mine] * split.size, sizes, split.group)  # [P*S, w]
    return got.view(split.size, mine, -1).transpose(0, 1).reshape(mine, -1)


def rows_to_shards(y_TiPW: torch.Tensor, num_tokens: int, split: "TokenSplit") -> torch.Tensor:
    """This rank's token chunk with every shard [T_i, P*w] -> every token with this
    rank's shard [T, w] (one all-to-all over TP)."""
    from megatron_mole.dispatch.alltoall import all_to_all

    sizes, _, _ = split.bounds(num_tokens)
    mine = sizes[split.rank]
    per_shard = y_TiPW.view(mine, split.size, -1).transpose(0, 1).reshape(split.size * mine, -1)
    return all_to_all(per_shard, sizes, [mine] * split.size, split.group)
