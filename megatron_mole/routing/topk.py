"""The ``"topk"`` router (LLaVA-MoLE / MoLA / Switch / Mixtral style).

p = softmax(W_g x) in fp32, the top-k experts are chosen and each chosen
expert's gate is its raw probability p_e (not renormalised, as LLaVA-MoLE and
MoLA do). Auxiliary losses: Switch/Mixtral load balancing N * sum_i f_i P_i and
the z-loss mean(logsumexp(logits)^2), scaled by ``aux_loss_coeff`` /
``z_loss_coeff``; padding tokens (``ctx.mask_T`` False) are excluded from both.

Legend: T tokens, D features, E experts, K = top_k.
"""
import torch

from megatron_mole.routing.base import Router, Routing, register_router
from megatron_mole.routing.losses import load_balancing_loss, z_loss


@register_router("topk")
class TopKRouter(Router):
    def forward(self, x_TD, ctx=None, reduce_logits=None) -> Routing:
        logits_TE = self.logits(x_TD, reduce_logits)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, expert_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        routing = Routing(expert_idx_TK=expert_idx_TK, gates_TK=gates_TK, probs_TE=probs_TE,
                          logits_TE=logits_TE, mask_T=None if ctx is None else ctx.mask_T)
        add_standard_aux_losses(routing, self.cfg)
        return routing


def add_standard_aux_losses(routing: Routing, cfg) -> None:
    """Add the balance and z losses (when their coefficients are non-zero) to
    ``routing.aux_losses`` (scaled) and ``stats`` (unscaled); other routers reuse this.
    Unused slots (``valid_TK`` False) and padding are left out."""
    if cfg.aux_loss_coeff > 0:
        lb = load_balancing_loss(routing.probs_TE, routing.expert_idx_TK, routing.mask_T, routing.valid_TK)
        routing.stats["load_balance"] = lb.detach()
        routing.aux_losses["load_balance"] = cfg.aux_loss_coeff * lb
    if cfg.z_loss_coeff > 0:
        z = z_loss(routing.logits_TE, routing.mask_T)
        routing.stats["z_loss"] = z.detach()
        routing.aux_losses["z_loss"] = cfg.z_loss_coeff * z
