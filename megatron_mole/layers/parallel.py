"""Tensor-parallel placement of adapters, derived from the base layer in one place.

Megatron column-parallel base (linear_qkv, linear_fc1; weight [out/tp, in]):
  A (and the router) replicated, B split along out exactly like the base
  weight (``partition_stride`` chunks: a fused SwiGLU fc1 keeps
  [gate_shard; up_shard]). The adapter input is the full input (all-gathered
  along the sequence under SP) and the r-dim activation goes through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce
  backward): every quantity before B then has the full, identical gradient on
  every TP rank, so A, the router and the gates need no extra gradient
  reduction, and the SP gather's backward is a plain split.
Megatron row-parallel base (linear_proj, linear_fc2; weight [out, in/tp]):
  A (and a linear-scope router) split along in like the base; the partial r-dim
  activation (and the partial router logits) are all-reduced
  (``reduce_from_tensor_model_parallel_region``); B replicated; the adapter
  output is full on every rank and, under SP, each rank keeps its sequence
  chunk (``scatter_to_sequence_parallel_region``, all-gather backward).
Only r-dim activations (and E-dim logits) cross TP ranks. Nothing here marks
params ``sequence_parallel``: their gradients are already complete and
identical on every TP rank, and Megatron's finalize_model_grads would sum them
again over TP.

Linears inside MoE experts (split over the expert-TP group, no communication of their own:
the token dispatcher's) take :class:`ExpertTPPlacement` (plain LoRA only; see its docstring).

:class:`NoParallel` is the single-device placement (all identities), used for
plain ``nn.Linear`` bases (Hugging Face inference, plain-PyTorch tests).

Sequence parallelism with a frozen Megatron (local) linear base
(``shares_sp_collectives``): the wrapper runs the frozen matmul itself so that base
and adapter share one collective each way, as Megatron's own layer would move:
a column base all-gathers its input once (``gather_shared``: backward one
reduce-scatter of the base's partial input gradient plus the adapter's complete
one divided by tp, so that the sum over ranks counts it once), a row base
reduce-scatters ``partial + adapter/tp`` once (``reduce_scatter_shared``: the
adapter's complete output enters each rank's partial sum divided by tp; its
gradient, the all-gathered output gradient, stays complete). Division by a
power-of-two tp is exact.
"""
from typing import Optional

import torch


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class _ForwardScale(torch.autograd.Function):
    """``x * scale`` forward; the gradient unchanged backward (a replicated tensor
    entering a sum over tp ranks: each rank adds 1/tp of it, and by Megatron's
    convention it keeps the complete gradient)."""

    @staticmethod
    def forward(ctx, x, scale):
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class NoParallel:
    kind = "none"
    tp_size, tp_rank, stride, sequence_parallel = 1, 0, 1, False

    def adapter_input(self, x):
        return x

    def after_down(self, u):
        return u

    def adapter_output(self, y):
        return y

    def reduce_logits(self):
        return None

    def dropout(self, x, p: float, training: bool):
        """Dropout on the adapter input (identical on TP ranks holding the same input)."""
        if p == 0 or not training:
            return x
        return torch.nn.functional.dropout(x, p, training=True)

    def output_is_local(self):
        """True when adapter_output is the identity (the adapter's rows are the
        base output's rows)."""
        return True

    def gate_and_reduce(self, u_SR, gate_S):
        """Gate the r-dim rows and make them complete on every TP rank."""
        return u_SR * gate_S.to(u_SR.dtype).unsqueeze(-1)

    def replicated(self, t):
        """Mark a TP-replicated tensor whose consumers see only a TP shard: its
        gradient is then all-reduced (identity here)."""
        return t

    def shares_sp_collectives(self, base=None) -> bool:
        """Whether base and adapter share the sequence-parallel collectives (see
        the module docstring): never without TP."""
        return False

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        return full

    def unshard(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        return local


class TPPlacement(NoParallel):
    """Placement for an adapter around a Megatron Column/RowParallelLinear.

    ``dim`` arguments of shard/unshard are adapter-tensor dims: the caller says
    which dim of A/B/router corresponds to the base's split dim (out for
    column, in for row); ``stride`` applies to the out dim of column bases.
    """

    def __init__(self, base, stride: Optional[int] = None, expert: bool = False):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        if isinstance(base, ColumnParallelLinear):
            self.kind = "column"
            if getattr(base, "gather_output", False):
                raise NotImplementedError(
                    f"{type(base).__name__} with gather_output=True is not a supported adapter base")
        elif isinstance(base, RowParallelLinear):
            self.kind = "row"
            if not base.input_is_parallel:
                raise NotImplementedError(
                    f"{type(base).__name__} with input_is_parallel=False is not a supported base")
        else:
            raise TypeError(f"adapter base must be Megatron's ColumnParallelLinear or "
                            f"RowParallelLinear, got {type(base).__name__}")
        if getattr(base, "explicit_expert_comm", False) and not expert:
            raise NotImplementedError("linears inside MoE experts (is_expert with TP/EP > 1) are not "
                                      "supported adapter bases (ExpertTPPlacement is, for a plain LoRA)")
        self.group = base.tp_group
        self.tp_size = self.group.size()
        self.tp_rank = self.group.rank()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        # Megatron sets partition_stride only when it initialises the weight
        # (not with perform_initialization=False): the caller's stride, derived
        # from the parent MLP, covers that case.
        self.stride = 1
        if self.kind == "column":
            self.stride = int(getattr(base.weight, "partition_stride", stride or 1))

    # -- forward plumbing -------------------------------------------------
    def adapter_input(self, x):
        if self.kind == "column" and self.sequence_parallel and self.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
            return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                        group=self.group)
        return x

    def after_down(self, u):
        if self.tp_size == 1:
            return u
        from megatron.core.tensor_parallel import mappings
        if self.kind == "column":
            return mappings.copy_to_tensor_model_parallel_region(u, group=self.group)
        return mappings.reduce_from_tensor_model_parallel_region(u, group=self.group)

    def gate_and_reduce(self, u_SR, gate_S):
        gate_S1 = gate_S.to(u_SR.dtype).unsqueeze(-1)
        # Column: gate, then copy_to (all-reduce backward) so the gate's gradient,
        # otherwise a partial sum over the B shards, is complete. Row: reduce
        # the partial rows first, then gate the complete rows.
        if self.kind == "column":
            return self.after_down(u_SR * gate_S1)
        return self.after_down(u_SR) * gate_S1

    def replicated(self, t):
        if self.tp_size == 1:
            return t
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
        return copy_to_tensor_model_parallel_region(t, group=self.group)

    def dropout(self, x, p: float, training: bool):
        """A TP-sharded input (row-parallel base) draws its mask from Megatron's
        model-parallel RNG stream; a replicated input from a stream identical on the TP
        ranks: the default one, or under sequence parallelism the tracker's data-parallel
        stream. There Megatron's TransformerBlock runs inside the model-parallel fork
        (the default generator *is* that TP-rank-dependent stream), and a draw outside a
        fork would also desynchronise the tracker's saved state from the live one, which
        activation recompute restores: the replay would draw other masks."""
        if p == 0 or not training or self.tp_size == 1:
            return super().dropout(x, p, training)
        if self.kind == "row":
            stream = None  # Megatron's model-parallel stream
        elif self.sequence_parallel:
            from megatron.core.tensor_parallel import random as mrandom
            stream = getattr(mrandom, "_DATA_PARALLEL_RNG_TRACKER_NAME", "data-parallel-rng")
        else:
            return super().dropout(x, p, training)
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        with get_cuda_rng_tracker().fork(*(() if stream is None else (stream,))):
            return torch.nn.functional.dropout(x, p, training=True)

    def shares_sp_collectives(self, base=None) -> bool:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        if not (self.sequence_parallel and self.tp_size > 1):
            return False
        if base is None:
            return True
        return (type(base) in (ColumnParallelLinear, RowParallelLinear) and not base.weight.requires_grad
                and not getattr(base, "explicit_expert_comm", False))

    def gather_shared(self, x):
        """Column base under SP: (full input for the frozen base, the same for the
        adapter, whose complete gradient is divided by tp) from one all-gather whose
        backward is one reduce-scatter."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=self.group)
        return full, _GradScale.apply(full, 1.0 / self.tp_size)

    def scale_shared_grad(self, x):
        """The adapter's view of a shared full input (``gather_shared``)."""
        return _GradScale.apply(x, 1.0 / self.tp_size)

    def share_into_partial(self, complete):
        """A replicated tensor's share of a sum over TP ranks (``complete / tp``, its
        gradient kept complete)."""
        return _ForwardScale.apply(complete, 1.0 / self.tp_size)

    def reduce_scatter_shared(self, partial, complete=None):
        """Row base under SP: this rank's sequence chunk of the sum over ranks of
        ``partial`` plus the replicated ``complete`` (counted once): one reduce-scatter."""
        from megatron.core.tensor_parallel.mappings import reduce_scatter_to_sequence_parallel_region

        if complete is not None:
            partial = partial + self.share_into_partial(complete.to(partial.dtype))
        return reduce_scatter_to_sequence_parallel_region(partial, group=self.group)

    def adapter_output(self, y):
        if self.kind == "row" and self.sequence_parallel and self.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
            return scatter_to_sequence_parallel_region(y, group=self.group)
        return y

    def output_is_local(self):
        return not (self.kind == "row" and self.sequence_parallel and self.tp_size > 1)

    def reduce_logits(self):
        if self.kind == "row" and self.tp_size > 1:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
            return lambda logits: reduce_from_tensor_model_parallel_region(logits, group=self.group)
        return None

    # -- full <-> local tensors ------------------------------------------
    def _chunks(self, size: int, dim_stride: int):
        parts = self.tp_size * dim_stride
        if size % parts:
            raise ValueError(f"dim of size {size} does not split into tp={self.tp_size} x "
                             f"stride={dim_stride} parts")
        step = size // parts
        return [(self.tp_rank + j * self.tp_size) * step for j in range(dim_stride)], step

    def shard(self, full: torch.Tensor, dim: int) -> torch.Tensor:
        if self.tp_size == 1:
            return full
        stride = self.stride if self.kind == "column" else 1
        starts, step = self._chunks(full.shape[dim], stride)
        return torch.cat([full.narrow(dim, s, step) for s in starts], dim=dim)

    def unshard(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        if self.tp_size == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.tp_size)]
        torch.distributed.all_gather(pieces, local.contiguous(), group=self.group)
        stride = self.stride if self.kind == "column" else 1
        # rank r holds chunks r, r + tp, ... (stride of them): interleave back
        chunks = [p.chunk(stride, dim=dim) for p in pieces]
        return torch.cat([chunks[r][j] for j in range(stride) for r in range(self.tp_size)], dim=dim)


class ExpertTPPlacement(TPPlacement):
    """Placement for a plain LoRA around a Megatron MoE expert's linear split over expert
    tensor parallelism (``explicit_expert_comm``; ``base.tp_group`` is the expert-TP group).

    Such a linear does no communication itself: the token dispatcher has already gathered
    the tokens (every expert-TP rank sees the same rows), the row-parallel fc2's output is
    left a partial sum that the dispatcher's combine reduce-scatters, and the column fc1's
    input gradient is a partial sum the dispatcher's gather backward reduce-scatters. The
    adapter keeps both conventions, and every replicated factor's gradient complete and
    identical on the expert-TP ranks (no extra grad reduction, as for dense bases):
    column (A replicated, B split like W with its stride): ``copy_to`` on the r-dim
    activation (complete gradient of A), the adapter's complete input gradient divided by
    tp (it enters the dispatcher's sum over ranks); row (A split along in, B replicated):
    the partial r-dim activation all-reduced, the complete output divided by tp (it
    enters the dispatcher's sum; its gradient, the all-gathered output gradient, kept).
    Division by a power-of-two tp is exact. No sequence-parallel collectives here."""

    def __init__(self, base, stride: Optional[int] = None):
        super().__init__(base, stride, expert=True)
        self.sequence_parallel = False  # the dispatcher did the sequence-parallel gather

    def adapter_input(self, x):
        return self.scale_shared_grad(x) if self.kind == "column" and self.tp_size > 1 else x

    def adapter_output(self, y):
        return self.share_into_partial(y) if self.kind == "row" and self.tp_size > 1 else y

    def output_is_local(self):
        return not (self.kind == "row" and self.tp_size > 1)

    def dropout(self, x, p: float, training: bool):
        if p and training:  # FactorLLM refuses it first (its PA errors must not be random)
            raise NotImplementedError("dropout on adapters of expert linears is not implemented")
        return x


def placement_for(base: Optional[torch.nn.Module], stride: Optional[int] = None):
    """NoParallel for a plain ``nn.Linear`` base (single device, Hugging Face
    modules), else the TP placement of a Megatron parallel linear. ``stride``:
    the output-dim partition stride when the weight does not carry it."""
    if base is None or isinstance(base, torch.nn.Linear):
        return NoParallel()
    return TPPlacement(base, stride)


def fc1_stride(mlp) -> int:
    """Partition stride of a Megatron MLP's fc1: 2 under a gated linear unit
    ([gate_shard; up_shard] per rank), as Megatron's MLP builds it."""
    config = getattr(mlp, "config", None)
    gated = bool(getattr(config, "gated_linear_unit", False))
    return 2 if gated and not getattr(config, "use_kitchen", False) else 1
