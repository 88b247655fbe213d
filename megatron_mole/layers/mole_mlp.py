"""MoLE with ``expert_scope="mlp"`` (LLaVA-MoLE / MixLoRA): one router per MLP.

Expert k is the frozen MLP with its own LoRA on fc1 and on fc2 (Megatron's fc1
fuses gate|up under SwiGLU: one LoRA on the fused fc1 output). With s = alpha/r,
p the router's top-k probabilities (not renormalised) and g = p renormalised
over the chosen k (sum 1):

    h_k = act(W1 x + p_k s B1_k A1_k x)
    y   = W2 (sum_k g_k h_k) + sum_k p_k s B2_k A2_k h_k

At top-1 this is exactly LLaVA-MoLE (y = W2 h + p s B2 A2 h,
h = act(W1 x + p s B1 A1 x)); with B = 0 it reproduces the frozen MLP at any k;
W2 runs once per token (W2 is linear, so W2 sum_k g_k h_k = sum_k g_k W2 h_k),
and the router gets the task gradient through p.

A router may use fewer than K experts for a token (``Routing.valid_TK``): its
unused slots get no row, g renormalises over the used ones, and the math above
holds with the sums over the used slots.

Fast path (DESIGN §4): rows are permuted once at the MLP input into slot-major
expert-sorted order (dispatch/local.py, through the seam of dispatch/seam.py). Block 0 holds every token once, so the
frozen fc1 runs once per token directly on block-0 rows and only the extra
top-k rows (k > 1) gather fc1's output; sum_k g_k h_k is accumulated into
block-0 rows, the frozen fc2 runs on them, and the output is un-permuted once.
No intermediate of T*k rows exists at k = 1. For SwiGLU the gather/add/
activation/fold run in one autograd Function with in-place buffers
(experts/mlp_core.py); other activations compose the same math with autograd.

TP/SP: the router sees the full sequence (SP gather with a split backward) so
routing is identical on every TP rank; the frozen fc1/fc2 run as F.linear on
the base weights with Megatron's copy/reduce mappings (under SP the rows are in
expert order, so fc2 all-reduces and each rank keeps its sequence chunk after
un-permuting). Adapter placement as in layers/parallel.py: A1 and the router
replicated, B1 split like fc1's output, A2 split like fc2's input, B2
replicated. The renormalised gates g reach a TP-sharded h, so they pass
``replicated`` (all-reduce backward) to get their complete gradient.

Exported names: ``{mlp}.mole.router.weight`` [E, H],
``{mlp}.linear_fc1.mole.lora_a`` [E, R, H], ``{mlp}.linear_fc1.mole.lora_b``
[E, F1, R] (F1 = 2F under a gated unit, rows [gate; up] as Megatron's full fc1
weight), ``{mlp}.linear_fc2.mole.lora_a`` [E, R, F], ``.lora_b`` [E, H, R].

Legend: T tokens, S = K*T sorted rows, K top-k, E experts, R rank, H hidden,
F ffn (local), F1 fc1 out (local).
"""
import torch
import torch.nn.functional as F

from megatron_mole.dispatch.seam import build_dispatch
from megatron_mole.dispatch.sharding import expert_sharding
from megatron_mole.experts import LoRAExperts
from megatron_mole.experts.mlp_core import swiglu_mixture
from megatron_mole.layers.base import AdapterWrapper
from megatron_mole.layers.context import routing_context
from megatron_mole.layers.parallel import fc1_stride, placement_for
from megatron_mole.layers.specs import (AdapterKind, UnitDims, kind_of, lora_tensors, register_adapter_kind,
                                        router_tensors)
from megatron_mole.routing import AUX_LOSS_TRACKER, attach_aux_loss, build_router

MLP_LINEARS = ("linear_fc1", "linear_fc2")


def mlp_activation(config):
    """(activation, is plain SwiGLU) of Megatron's MLP (its unfused path), from its config."""
    for flag in ("use_te_activation_func",):
        if getattr(config, flag, False):
            raise NotImplementedError(f"expert_scope='mlp' does not support config.{flag}=True")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        raise NotImplementedError("expert_scope='mlp' does not support activation_func_clamp_value")
    act = config.activation_func
    if not config.gated_linear_unit:
        return act, False
    offset = getattr(config, "glu_linear_offset", 0.0) or 0.0

    def glu(z):
        gate, up = torch.chunk(z, 2, dim=-1)
        return act(gate) * (up + offset) if offset else act(gate) * up
    return glu, act is F.silu and not offset


class MoLEMLP(AdapterWrapper):
    kind = "mole_mlp"
    param_rewrites = {"mole.router.": "router.", "linear_fc1.mole.": "fc1.", "linear_fc2.mole.": "fc2."}
    layer_number = None  # global 0-based layer, set by apply_mole

    def __init__(self, base, cfg, adapt_fc1: bool = True, adapt_fc2: bool = True):
        super().__init__()
        self.base, self.cfg = base, cfg
        fc1, fc2 = base.linear_fc1, base.linear_fc2
        self.place1, self.place2 = placement_for(fc1, fc1_stride(base)), placement_for(fc2)
        self.act, self.swiglu = mlp_activation(base.config)
        hidden = fc1.weight.shape[1]
        dtype, device = fc1.weight.dtype, fc1.weight.device
        self.router = build_router(hidden, cfg, device=device)
        ffn_full = fc2.weight.shape[1] * self.place2.tp_size
        fc1_full = fc1.weight.shape[0] * self.place1.tp_size
        full = {"linear_fc1": (hidden, fc1_full), "linear_fc2": (ffn_full, hidden)}
        self.adapted = tuple(n for n, on in zip(MLP_LINEARS, (adapt_fc1, adapt_fc2)) if on)
        self._dims = UnitDims(tuple((n, full[n]) for n in self.adapted))
        per_expert = kind_of(self.kind).expert_params(cfg, self._dims)
        self.sharding = expert_sharding(cfg, [full["linear_fc1"], full["linear_fc2"]], per_expert)
        num_local = self.sharding.num_local(cfg.num_experts)
        # Experts on fc1 and/or fc2, as the targets say; a missing one adds nothing.
        self.fc1 = self.fc2 = None
        if adapt_fc1:
            self.fc1 = LoRAExperts(num_local, hidden, fc1.weight.shape[0], cfg.rank,
                                   cfg.grouped_mm_backend, dtype, device)
        if adapt_fc2:
            self.fc2 = LoRAExperts(num_local, fc2.weight.shape[1], fc2.weight.shape[0],
                                   cfg.rank, cfg.grouped_mm_backend, dtype, device)
        # Every TP rank holds the MLP input: under EP they split the dispatch; the
        # expert rows leave the expert's TP peers complete (after fc2's reduce).
        self.dispatch = build_dispatch(cfg, self.sharding, self.place1, tp_split=True, out_sharded=False)

    def unit_dims(self) -> UnitDims:
        return self._dims

    def placement_of(self, linear):
        return self.place2 if linear == "linear_fc2" else self.place1


    def forward(self, x, per_token_scale=None, padding_mask=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("MoLEMLP: per_token_scale (MoE expert MLPs) is not supported")
        # Sequence parallelism, local experts, frozen Megatron linears: the MLP moves what
        # Megatron's MLP moves (one all-gather in, one reduce-scatter out; layers/parallel.py)
        shared = (self.dispatch.local and self.place1.shares_sp_collectives(self.base.linear_fc1)
                  and self.place2.shares_sp_collectives(self.base.linear_fc2))
        if shared:
            x_full, x_route = self.place1.gather_shared(x)
        else:
            x_full = x_route = self.place1.adapter_input(x)
        seq, batch, hidden = x_full.shape
        ctx = routing_context(x_full.shape, self.layer_number, self.training, padding_mask)
        routing = self.router(x_route.reshape(-1, hidden), ctx)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, routing.logged_stats())
        x_TH = x_full.reshape(-1, hidden)
        if self.dispatch.local:
            y_TH = self.mixture(x_TH, routing, shared)
        else:
            y_TH = self.expert_side_mixture(x_TH, routing)
        y = y_TH.view(seq, batch, y_TH.shape[-1])
        out = self.place2.reduce_scatter_shared(y) if shared else self.place2.adapter_output(y)
        fc2 = self.base.linear_fc2
        skip_bias_add = getattr(fc2, "skip_bias_add", False)
        bias = fc2.bias if skip_bias_add else None
        if fc2.bias is not None and not skip_bias_add:
            out = out + fc2.bias
        return attach_aux_loss(out, routing.aux_loss), bias

    def _lora(self, experts, rows, p_S, counts, place):
        return experts.block(rows, p_S * self.cfg.scaling, counts, place, self.cfg.dropout, self.training)

    def mixture(self, x_TH, routing, shared: bool = False):
        """Every expert on this rank: the fused sorted-rows path (module docstring).
        ``shared``: the SP collectives are shared with the frozen base; then the
        output rows are partial sums over TP (the caller reduce-scatters them)."""
        p1, p2 = self.place1, self.place2
        fc1, fc2 = self.base.linear_fc1, self.base.linear_fc2
        x_SH, p_S, handle = self.dispatch.permute(x_TH, routing)
        x_adapter_SH = p1.scale_shared_grad(x_SH) if shared else x_SH
        plan, counts = handle.plan, handle.counts
        T, sizes = plan.num_tokens, plan.block_sizes
        if sizes[0] != T:
            raise ValueError(f"router {self.cfg.router!r}: slot 0 must hold an expert for every token "
                             f"({sizes[0]} of {T} do)")
        extra = x_SH.shape[0] - T  # rows of the other slots

        # frozen fc1 once per token, on block 0 (all tokens, expert-sorted)
        x0_TH = torch.split(x_SH, [T, extra])[0] if extra else x_SH
        # (shared: the input's gradient may stay partial, the reduce-scatter sums it)
        base1_TF1 = F.linear(x0_TH if shared else p1.replicated(x0_TH), fc1.weight)
        if fc1.bias is not None:
            base1_TF1 = base1_TF1 + fc1.bias
        rest = plan.block0_position(torch.arange(T, T + extra, device=x_SH.device)) if extra else None
        g_S = None
        if extra:  # renormalised gates; they meet TP-sharded h: complete their gradient
            gsum_S = plan.per_row(routing.masked_gates().sum(-1))
            g_S = p2.replicated((p_S / gsum_S).to(base1_TF1.dtype))

        hbar_TF = None
        if self.fc1 is not None:
            delta_SF1 = self._lora(self.fc1, x_adapter_SH, p_S, counts, p1)
        if self.fc1 is not None and self.swiglu and T > 0:  # (split(0) refuses an empty batch)
            h_SF, hbar_TF = swiglu_mixture(base1_TF1, delta_SF1, g_S, plan)
        else:  # generic activation: the same math composed by autograd
            base1_SF1 = torch.cat([base1_TF1, base1_TF1.index_select(0, rest)]) if extra else base1_TF1
            h_SF = self.act(base1_SF1 if self.fc1 is None else base1_SF1 + delta_SF1)
            if extra:
                hbar_TF = _fold_into_block0(h_SF * g_S.unsqueeze(-1), T, rest)

        y2_SH = None if self.fc2 is None else self._lora(self.fc2, h_SF, p_S, counts, p2)
        if not extra:  # one expert per token: its renormalised gate is exactly 1
            hbar_TF, y2_TH = h_SF, y2_SH
        else:
            y2_TH = None if y2_SH is None else _fold_into_block0(y2_SH, T, rest)
        out_TH = F.linear(hbar_TF, fc2.weight)
        if shared:  # partial rows; the complete adapter rows enter the reduce-scatter once
            if y2_TH is not None:
                out_TH = out_TH + p2.share_into_partial(y2_TH)
        else:
            out_TH = p2.after_down(out_TH)
            if y2_TH is not None:
                out_TH = out_TH + y2_TH
        return plan.unpermute_block0(out_TH)  # block-0 rows -> token order, once

    def expert_side_mixture(self, x_TH, routing):
        """Expert parallelism: every (token, slot) row runs its whole expert MLP on
        the expert's rank, row_out = g W2 h + p s B2 A2 h with
        h = act(W1 x + p s B1 A1 x), and ``combine`` sums a token's rows at home.
        Same math as ``mixture`` (W2 is linear); only H-wide rows cross ranks, at
        the price of running the frozen MLP once per row. p and g travel with the
        rows as two gate channels. Under TP the ranks that hold the same tokens
        dispatch one chunk each (dispatch/tp_split.py, behind the seam)."""
        p1, p2 = self.place1, self.place2
        fc1, fc2 = self.base.linear_fc1, self.base.linear_fc2
        one_per_token = routing.gates_TK.shape[1] == 1
        gates_TKC = torch.stack([routing.masked_gates(), routing.renormalised_gates()], -1)
        x_SH, pg_SC, handle = self.dispatch.permute(x_TH, routing, gates_TKC)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, handle.stats)
        p_S, g_S = pg_SC.unbind(-1)
        z_SF1 = F.linear(p1.replicated(x_SH), fc1.weight)
        if fc1.bias is not None:
            z_SF1 = z_SF1 + fc1.bias
        if self.fc1 is not None:
            z_SF1 = z_SF1 + self._lora(self.fc1, x_SH, p_S, handle.counts, p1)
        h_SF = self.act(z_SF1)
        hg_SF = h_SF if one_per_token else h_SF * p2.replicated(g_S.to(h_SF.dtype)).unsqueeze(-1)
        y_SH = p2.after_down(F.linear(hg_SF, fc2.weight))
        if self.fc2 is not None:
            y_SH = y_SH + self._lora(self.fc2, h_SF, p_S, handle.counts, p2)
        return self.dispatch.combine(y_SH, handle)


def _fold_into_block0(v_SD, num_tokens, rest_pos):
    """Block-0 rows plus the other slots' rows added at their token's block-0 row."""
    first_TD, rest_RD = torch.split(v_SD, [num_tokens, v_SD.shape[0] - num_tokens])
    return first_TD.index_add(0, rest_pos, rest_RD)


@register_adapter_kind
class MoLEMLPKind(AdapterKind):
    """One router per MLP (fed the MLP input) and LoRA experts on its adapted linears."""

    name, unit, wrapper, input_linear = "mole_mlp", "mlp", MoLEMLP, "linear_fc1"

    def probe_linears(self):
        return MLP_LINEARS

    def tensors(self, cfg, dims):
        linears = dict(dims.linears)
        hidden = linears["linear_fc1"][0] if "linear_fc1" in linears else linears["linear_fc2"][1]
        out = router_tensors(cfg, hidden, "mole")
        for name in MLP_LINEARS:
            if name in linears:
                d_in, d_out = linears[name]
                out += lora_tensors(cfg, d_in, d_out, f"{name}.mole", linear=name, experts=True)
        return out
