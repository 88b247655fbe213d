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

Fast path (DESIGN §4): rows are permuted once at the MLP input into slot-major
expert-sorted order (dispatch/local.py). Block 0 holds every token once, so the
frozen fc1 runs once per token directly on block-0 rows and only the extra
top-k rows (k > 1) gather fc1's output; sum_k g_k h_k is accumulated into
block-0 rows, the frozen fc2 runs on them, and the output is un-permuted once.
No intermediate of T*k rows exists at k = 1. For SwiGLU the gather/add/
activation/fold run in one autograd Function with in-place buffers
(layers/mlp_core.py); other activations compose the same math with autograd.

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

from megatron_mole.experts import LoRAExperts
from megatron_mole.layers.base import AdapterTensor, AdapterWrapper
from megatron_mole.layers.expert_parallel import build_expert_dispatcher, expert_sharding
from megatron_mole.layers.tp_split import TokenSplit
from megatron_mole.layers.linear import adapter_dropout, split_dims
from megatron_mole.layers.mlp_core import swiglu_mixture
from megatron_mole.layers.parallel import fc1_stride, placement_for
from megatron_mole.routing import AUX_LOSS_TRACKER, attach_aux_loss, build_router


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
        self.sharding = expert_sharding(cfg, [(hidden, fc1_full), (ffn_full, hidden)])
        num_local = self.sharding.num_local(cfg.num_experts)
        # Experts on fc1 and/or fc2, as the targets say; a missing one adds nothing.
        self.fc1 = self.fc2 = None
        if adapt_fc1:
            self.fc1 = LoRAExperts(num_local, hidden, fc1.weight.shape[0], cfg.rank,
                                   cfg.grouped_mm_backend, dtype, device)
        if adapt_fc2:
            self.fc2 = LoRAExperts(num_local, fc2.weight.shape[1], fc2.weight.shape[0],
                                   cfg.rank, cfg.grouped_mm_backend, dtype, device)
        self.dispatcher = build_expert_dispatcher(cfg, self.sharding)

    def adapter_tensors(self):
        cfg, p1, p2 = self.cfg, self.place1, self.place2
        b_init = "kaiming" if cfg.lora_b_init == "random" else "zeros"
        a1, b1, _ = split_dims(p1, expert_dim=True)
        a2, b2, _ = split_dims(p2, expert_dim=True)
        hidden = self.router.weight.shape[1]
        ffn = self.base.linear_fc2.weight.shape[1] * p2.tp_size
        out = [AdapterTensor("mole.router.weight", self.router.weight, p1, None, "kaiming", hidden)]
        if self.fc1 is not None:
            out += [AdapterTensor("linear_fc1.mole.lora_a", self.fc1.lora_a, p1, a1, "kaiming", hidden,
                                  self.sharding),
                    AdapterTensor("linear_fc1.mole.lora_b", self.fc1.lora_b, p1, b1, b_init, cfg.rank,
                                  self.sharding)]
        if self.fc2 is not None:
            out += [AdapterTensor("linear_fc2.mole.lora_a", self.fc2.lora_a, p2, a2, "kaiming", ffn,
                                  self.sharding),
                    AdapterTensor("linear_fc2.mole.lora_b", self.fc2.lora_b, p2, b2, b_init, cfg.rank,
                                  self.sharding)]
        return out

    def forward(self, x, per_token_scale=None, padding_mask=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("MoLEMLP: per_token_scale (MoE expert MLPs) is not supported")
        x_full = self.place1.adapter_input(x)
        seq, batch, hidden = x_full.shape
        mask_T = None
        if padding_mask is not None:  # Megatron: [b, s], True = padding; rows are s-major
            mask_T = (~padding_mask.bool()).t().reshape(-1)
        x_TH = x_full.reshape(-1, hidden)
        routing = self.router(x_TH, mask_T=mask_T)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, routing.stats)
        y_TH = self.mixture(x_TH, routing)
        out = self.place2.adapter_output(y_TH.view(seq, batch, y_TH.shape[-1]))
        fc2 = self.base.linear_fc2
        skip_bias_add = getattr(fc2, "skip_bias_add", False)
        bias = fc2.bias if skip_bias_add else None
        if fc2.bias is not None and not skip_bias_add:
            out = out + fc2.bias
        return attach_aux_loss(out, routing.aux_loss), bias

    def mixture(self, x_TH, routing):
        if self.sharding.size > 1:
            return self.expert_side_mixture(x_TH, routing)
        cfg, p1, p2 = self.cfg, self.place1, self.place2
        fc1, fc2 = self.base.linear_fc1, self.base.linear_fc2
        x_SH, p_S, plan = self.dispatcher.permute(x_TH, routing.expert_idx_TK, routing.gates_TK)
        T, K, counts = plan.num_tokens, plan.top_k, plan.counts_G

        # frozen fc1 once per token, on block 0 (all tokens, expert-sorted)
        x0_TH = torch.split(x_SH, [T, (K - 1) * T])[0] if K > 1 else x_SH
        base1_TF1 = F.linear(p1.replicated(x0_TH), fc1.weight)
        if fc1.bias is not None:
            base1_TF1 = base1_TF1 + fc1.bias
        rest = plan.block0_position(torch.arange(T, K * T, device=x_SH.device)) if K > 1 else None
        g_S = None
        if K > 1:  # renormalised gates; they meet TP-sharded h: complete their gradient
            gsum_S = routing.gates_TK.sum(-1).index_select(0, plan.tok_S)
            g_S = p2.replicated((p_S / gsum_S).to(base1_TF1.dtype))

        hbar_TF = None
        if self.fc1 is not None:
            x_SH = adapter_dropout(x_SH, cfg.dropout, p1, self.training)
            u1_SR = p1.gate_and_reduce(self.fc1.down(x_SH, counts), p_S * cfg.scaling)
            delta_SF1 = self.fc1.up(u1_SR, counts)
        if self.fc1 is not None and self.swiglu and T > 0:  # (split(0) refuses an empty batch)
            h_SF, hbar_TF = swiglu_mixture(base1_TF1, delta_SF1, g_S, plan)
        else:  # generic activation: the same math composed by autograd
            base1_SF1 = base1_TF1 if K == 1 else torch.cat([base1_TF1, base1_TF1.index_select(0, rest)])
            h_SF = self.act(base1_SF1 if self.fc1 is None else base1_SF1 + delta_SF1)
            if K > 1:
                hbar_TF = _fold_into_block0(h_SF * g_S.unsqueeze(-1), T, rest)

        y2_SH = None
        if self.fc2 is not None:
            h_drop_SF = adapter_dropout(h_SF, cfg.dropout, p2, self.training)
            u2_SR = p2.gate_and_reduce(self.fc2.down(h_drop_SF, counts), p_S * cfg.scaling)
            y2_SH = self.fc2.up(u2_SR, counts)

        if K == 1:  # renormalised top-1 gate is exactly 1
            hbar_TF, y2_TH = h_SF, y2_SH
        else:
            y2_TH = None if y2_SH is None else _fold_into_block0(y2_SH, T, rest)
        out_TH = p2.after_down(F.linear(hbar_TF, fc2.weight))
        if y2_TH is not None:
            out_TH = out_TH + y2_TH
        # block-0 rows -> token order, once
        return out_TH.index_select(0, plan.row_of_KT[0])

    def expert_side_mixture(self, x_TH, routing):
        """Expert parallelism: every (token, slot) row runs its whole expert MLP on
        the expert's rank, row_out = g W2 h + p s B2 A2 h with
        h = act(W1 x + p s B1 A1 x), and ``combine`` sums a token's K rows at home.
        Same math as ``mixture`` (W2 is linear); only H-wide rows cross ranks, at
        the price of running the frozen MLP once per row (K times per token).
        p and g travel with the rows as two gate channels. Under TP the ranks that
        hold the same tokens dispatch one chunk each (layers/tp_split.py)."""
        cfg, p1, p2 = self.cfg, self.place1, self.place2
        fc1, fc2 = self.base.linear_fc1, self.base.linear_fc2
        num_tokens = x_TH.shape[0]
        gates_TK = routing.gates_TK
        K = gates_TK.shape[1]
        gates_TKC = torch.stack([gates_TK, gates_TK / gates_TK.sum(-1, keepdim=True)], -1)
        idx_TK = routing.expert_idx_TK
        split = TokenSplit(p1.group) if p1.tp_size > 1 else None
        if split is not None:
            _, start, stop = split.bounds(num_tokens)
            x_TH, gates_TKC, idx_TK = split.take_chunk(x_TH), split.take_chunk(gates_TKC), idx_TK[start:stop]
        x_SH, pg_SC, plan = self.dispatcher.permute(x_TH, idx_TK, gates_TKC)
        counts = plan.counts_G
        if split is not None:  # every TP peer of the expert runs its shard on all their rows
            (x_SH, pg_SC), counts, undo = split.gather_rows(counts, x_SH, pg_SC)
        p_S, g_S = pg_SC.unbind(-1)
        z_SF1 = F.linear(p1.replicated(x_SH), fc1.weight)
        if fc1.bias is not None:
            z_SF1 = z_SF1 + fc1.bias
        if self.fc1 is not None:
            x_drop_SH = adapter_dropout(x_SH, cfg.dropout, p1, self.training)
            u1_SR = p1.gate_and_reduce(self.fc1.down(x_drop_SH, counts), p_S * cfg.scaling)
            z_SF1 = z_SF1 + self.fc1.up(u1_SR, counts)
        h_SF = self.act(z_SF1)
        hg_SF = h_SF if K == 1 else h_SF * p2.replicated(g_S.to(h_SF.dtype)).unsqueeze(-1)
        y_SH = p2.after_down(F.linear(hg_SF, fc2.weight))
        if self.fc2 is not None:
            h_drop_SF = adapter_dropout(h_SF, cfg.dropout, p2, self.training)
            u2_SR = p2.gate_and_reduce(self.fc2.down(h_drop_SF, counts), p_S * cfg.scaling)
            y_SH = y_SH + self.fc2.up(u2_SR, counts)
        if split is None:
            return self.dispatcher.combine(y_SH, plan)
        y_chunk = self.dispatcher.combine(split.own_rows(y_SH, undo), plan)
        return split.gather_tokens(y_chunk, num_tokens)


def _fold_into_block0(v_SD, num_tokens, rest_pos):
    """Block-0 rows plus the other slots' rows added at their token's block-0 row."""
    first_TD, rest_RD = torch.split(v_SD, [num_tokens, v_SD.shape[0] - num_tokens])
    return first_TD.index_add(0, rest_pos, rest_RD)
