"""Adapters around one Megatron parallel linear: a plain LoRA and a MoLE mixture.

- :class:`LoRALinear` (kind ``"lora"``): y = W x + (alpha/r) B A dropout(x).
  Exported as ``{path}.lora.lora_a`` [R, I] and ``{path}.lora.lora_b`` [O, R].
- :class:`MoLELinear` (kind ``"mole_linear"``, ``expert_scope="linear"``,
  MoLA/DynMoLE): the linear's own router fed the linear's input,
  y = W x + sum_k p_k (alpha/r) B_k A_k dropout(x), with p the router's
  (un-renormalised) gates. Exported as ``{path}.mole.router.weight`` [E, I]
  (and any other router tensor), ``{path}.mole.lora_a`` [E, R, I],
  ``{path}.mole.lora_b`` [E, O, R].

The wrapper keeps the base linear as child ``base`` and returns what the base
returns ((output, bias) for Megatron linears, a tensor for nn.Linear), so the
parent module calls it unchanged. TP/SP plumbing comes from layers/parallel.py;
routing from routing/; permute/combine from the dispatch seam (dispatch/seam.py);
the expert block from experts/. The gate multiplies the r-dim activation
(B_k (p_k u) = p_k B_k u), which is where TP needs it (see parallel.py).

Legend: T tokens, S sorted rows, E experts, R rank, I in (local), O out (local).
"""
import torch

from megatron_mole.dispatch.seam import build_dispatch
from megatron_mole.dispatch.sharding import expert_sharding
from megatron_mole.experts import LoRA, LoRAExperts
from megatron_mole.layers.base import AdapterWrapper
from megatron_mole.layers.context import routing_context
from megatron_mole.layers.parallel import placement_for
from megatron_mole.layers.specs import (AdapterKind, UnitDims, kind_of, lora_tensors, register_adapter_kind,
                                        router_tensors)
from megatron_mole.routing import AUX_LOSS_TRACKER, attach_aux_loss, build_router


class LinearAdapter(AdapterWrapper):
    """Base of the adapters around one linear: runs the base, adds ``delta``."""

    layer_number = None  # global 0-based layer, set by apply_mole

    def __init__(self, base, cfg, placement=None):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.place = placement if placement is not None else placement_for(base)
        self.out_local, self.in_local = base.weight.shape
        self.dtype, self.device = base.weight.dtype, base.weight.device

    def unit_dims(self) -> UnitDims:
        tp, kind = self.place.tp_size, self.place.kind
        return UnitDims.linear(self.in_local * (tp if kind == "row" else 1),
                               self.out_local * (tp if kind == "column" else 1))

    def placement_of(self, linear):
        return self.place

    def forward(self, x, *args, **kwargs):
        if not args and not kwargs and self.place.shares_sp_collectives(self.base):
            return self._forward_sharing_sp_collectives(x)
        res = self.base(x, *args, **kwargs)
        # Megatron linears return (output, bias); a plain nn.Linear a tensor.
        out, bias = res if isinstance(res, tuple) else (res, None)
        x_full = self.place.adapter_input(x)
        x_TI = x_full.reshape(-1, x_full.shape[-1])
        ctx = routing_context(x_full.shape, self.layer_number, self.training)
        if self.place.output_is_local() and out.is_contiguous():
            # the adapter output lands on the base output's rows: scatter-add onto them
            y_TO, aux = self.delta(x_TI, ctx, into_TO=out.view(-1, out.shape[-1]))
            out = y_TO.view_as(out)
        else:
            y_TO, aux = self.delta(x_TI, ctx)
            y = self.place.adapter_output(y_TO.view(*x_full.shape[:-1], y_TO.shape[-1]))
            out = out + y.to(out.dtype)
        out = attach_aux_loss(out, aux)
        return (out, bias) if isinstance(res, tuple) else out

    def _forward_sharing_sp_collectives(self, x):
        """Sequence parallelism on a frozen Megatron linear: the frozen matmul runs
        here so that base and adapter share one all-gather (column) or one
        reduce-scatter (row) each way (layers/parallel.py)."""
        base, place = self.base, self.place
        skip_bias_add = getattr(base, "skip_bias_add", False)
        bias = None if skip_bias_add else base.bias
        if place.kind == "column":
            x_full, x_adapter = place.gather_shared(x)
            out = torch.nn.functional.linear(x_full, base.weight, bias)
            ctx = routing_context(x_full.shape, self.layer_number, self.training)
            y_TO, aux = self.delta(x_adapter.reshape(-1, x_adapter.shape[-1]), ctx,
                                   into_TO=out.reshape(-1, out.shape[-1]))
            out = y_TO.view_as(out)
        else:
            ctx = routing_context(x.shape, self.layer_number, self.training)
            y_TO, aux = self.delta(x.reshape(-1, x.shape[-1]), ctx)
            partial = torch.nn.functional.linear(x, base.weight)
            out = place.reduce_scatter_shared(partial, y_TO.view(*x.shape[:-1], y_TO.shape[-1]))
            if bias is not None:
                out = out + bias
        return attach_aux_loss(out, aux), (base.bias if skip_bias_add else None)

    def delta(self, x_TI, ctx, into_TO=None):  # pragma: no cover
        raise NotImplementedError


class LoRALinear(LinearAdapter):
    kind = "lora"

    def __init__(self, base, cfg, placement=None):
        super().__init__(base, cfg, placement)
        self.lora = LoRA(self.in_local, self.out_local, cfg.rank, self.dtype, self.device)

    def delta(self, x_TI, ctx, into_TO=None):
        x_TI = self.place.dropout(x_TI, self.cfg.dropout, self.training)
        u_TR = self.place.after_down(self.lora.down(x_TI)) * self.cfg.scaling
        y_TO = self.lora.up(u_TR)
        # out-of-place, as PEFT does: the benchmark's LoRA baseline
        return (y_TO if into_TO is None else into_TO + y_TO), None


class MoLELinear(LinearAdapter):
    kind = "mole_linear"
    def __init__(self, base, cfg, placement=None):
        super().__init__(base, cfg, placement)
        self.router = build_router(self.in_local, cfg, device=self.device)
        dims = self.unit_dims()
        per_expert = kind_of(self.kind).expert_params(cfg, dims)
        self.sharding = expert_sharding(cfg, [dims.of(None)], per_expert)
        self.mole = LoRAExperts(self.sharding.num_local(cfg.num_experts), self.in_local,
                                self.out_local, cfg.rank, cfg.grouped_mm_backend, self.dtype,
                                self.device)
        # Under EP the TP ranks of a column-parallel base hold the same tokens:
        # each dispatches one chunk, and its expert outputs are out-shards.
        column = self.place.kind == "column"
        self.dispatch = build_dispatch(cfg, self.sharding, self.place, tp_split=column, out_sharded=column)

    param_rewrites = {"mole.router.": "router."}

    def delta(self, x_TI, ctx, into_TO=None):
        routing = self.router(x_TI, ctx, reduce_logits=self.place.reduce_logits())
        AUX_LOSS_TRACKER.record(self.adapter_prefix, routing.logged_stats())
        x_TI = self.place.dropout(x_TI, self.cfg.dropout, self.training)
        x_SI, gates_S, handle = self.dispatch.permute(x_TI, routing)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, handle.stats)
        y_SO = self.mole.block(x_SI, gates_S * self.cfg.scaling, handle.counts, self.place, 0.0, self.training)
        return self.dispatch.combine(y_SO, handle, into=into_TO), routing.aux_loss


@register_adapter_kind
class LoRAKind(AdapterKind):
    name, unit, wrapper = "lora", "linear", LoRALinear

    def tensors(self, cfg, dims):
        d_in, d_out = dims.of(None)
        return lora_tensors(cfg, d_in, d_out, "lora")


@register_adapter_kind
class MoLELinearKind(AdapterKind):
    name, unit, wrapper = "mole_linear", "linear", MoLELinear

    def tensors(self, cfg, dims):
        d_in, d_out = dims.of(None)
        return router_tensors(cfg, d_in, "mole") + lora_tensors(cfg, d_in, d_out, "mole", experts=True)

