"""The ``"gw"`` router: GW-MoE's broadcast of uncertain tokens.

p = softmax(W_g x) (fp32); a token is uncertain when its routing entropy
H(p) = -sum_i p_i log p_i (nats, not normalised) is >= ``tau``. During training, the
uncertain tokens of each sequence — at most ``max_slots`` of them, the earliest by
position — go to **every** expert with gates p_i (the output is sum_i p_i E_i(x));
all other tokens are routed top-k with gates p (as ``topk``). In evaluation every
token is routed top-k: no inference overhead, and the router equals ``topk``. No loss
of its own (the balance and z losses as every router; broadcast tokens count with
all their experts).

GW-MoE's released code never calls the experts on the broadcast branch (it writes
p_i * x, overwritten per expert); this follows the paper. Sequences are the rows'
batch entries ([s, b] layout from the routing context), split further by
packed-sequence ids when the model supplies them; without a layout all rows form
one sequence.

Defaults: ``tau`` = 0.77 ln(E) (the paper's 1.6 for its 8 experts; H never exceeds
ln E, so an absolute tau must follow E), ``max_slots`` = 8 (our choice: the paper
bounds the count but its value depends on the task). Statistics:
``broadcast_fraction`` of the tokens.

Legend: T tokens, E experts, K = top_k.
"""
import math

import torch

from megatron_mole.routing.base import Router, Routing, register_router
from megatron_mole.routing.topk import _masked_mean, add_standard_aux_losses


def _positive_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def earliest_per_sequence(flag_T: torch.Tensor, sequence_T: torch.Tensor, limit: int) -> torch.Tensor:
    """``flag_T`` kept for at most ``limit`` rows of each sequence id, the earliest rows
    first (rows are in position order within a sequence). No host sync."""
    order = torch.argsort(sequence_T, stable=True)
    flags = flag_T.index_select(0, order).long()
    seq = sequence_T.index_select(0, order)
    running = torch.cumsum(flags, 0)
    # each row's sequence starts at the last row where the id changed (a running max of
    # the boundaries' positions); the flags counted before that start are not its own
    position = torch.arange(seq.numel(), device=seq.device)
    boundary = torch.ones_like(seq, dtype=torch.bool)
    boundary[1:] = seq[1:] != seq[:-1]
    first = torch.where(boundary, position, torch.zeros_like(position)).cummax(0).values
    rank = running - (running - flags).index_select(0, first)  # 1-based among the sequence's flagged rows
    keep_sorted = flags.bool() & (rank <= limit)
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def sequence_ids(num_tokens: int, ctx, device) -> torch.Tensor:
    """An id per row naming its sequence (batch entry, and packed segment when known)."""
    if ctx is None or ctx.batch is None or ctx.seq_len is None or ctx.seq_len * ctx.batch != num_tokens:
        return torch.zeros(num_tokens, dtype=torch.long, device=device)
    ids = torch.arange(num_tokens, device=device) % ctx.batch  # s-major rows: row = s * b + batch entry
    if ctx.segment_ids_T is not None:
        ids = ids + ctx.batch * ctx.segment_ids_T.to(device=device, dtype=torch.long)
    return ids


@register_router("gw")
class GWRouter(Router):
    ARGS = {"tau": (None, _positive_number, "a number > 0 (nats)"),
            "max_slots": (8, _count, "an int >= 0")}

    def tau(self) -> float:
        tau = self.arg("tau")
        return 0.77 * math.log(self.num_experts) if tau is None else float(tau)

    def forward(self, x_TD, ctx=None, reduce_logits=None) -> Routing:
        logits_TE = self.logits(x_TD, reduce_logits)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        mask_T = None if ctx is None else ctx.mask_T
        training = ctx is not None and ctx.training
        if not training or self.top_k == self.num_experts:
            gates_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
            broadcast_T = torch.zeros(probs_TE.shape[0], dtype=torch.bool, device=probs_TE.device)
            routing = Routing(idx_TK, gates_TK, probs_TE, logits_TE, mask_T=mask_T)
        else:
            with torch.no_grad():
                entropy_T = -(probs_TE * probs_TE.clamp(min=1e-30).log()).sum(-1)
                uncertain_T = entropy_T >= self.tau()
                if mask_T is not None:
                    uncertain_T = uncertain_T & mask_T.bool()
                seq_T = sequence_ids(probs_TE.shape[0], ctx, probs_TE.device)
                broadcast_T = earliest_per_sequence(uncertain_T, seq_T, self.arg("max_slots"))
            # every expert, sorted by p: the first K slots are the top-k choice
            gates_TE, idx_TE = torch.sort(probs_TE, dim=-1, descending=True)
            slot_E = torch.arange(self.num_experts, device=probs_TE.device)
            valid_TE = (slot_E[None, :] < self.top_k) | broadcast_T[:, None]
            routing = Routing(idx_TE, gates_TE, probs_TE, logits_TE, valid_TK=valid_TE, mask_T=mask_T)
        add_standard_aux_losses(routing, self.cfg, self, ctx)
        routing.stats["broadcast_fraction"] = _masked_mean(broadcast_T.float(), mask_T)
        return routing
