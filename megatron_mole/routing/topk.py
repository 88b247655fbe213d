"""The ``"topk"`` router (LLaVA-MoLE / MoLA / Switch / Mixtral style).

p = softmax(W_g x) in fp32, the top-k experts are chosen and each chosen
expert's gate is its raw probability p_e (not renormalised, as LLaVA-MoLE and
MoLA do) unless ``router_args.renormalize`` (Mixtral: the k gates rescaled to
sum 1). ``router_args.jitter`` (Switch Transformer): during training the router
input is multiplied by noise uniform in [1 - jitter, 1 + jitter] (the router's
view only; the experts see the clean input). Auxiliary losses: Switch/Mixtral
load balancing N * sum_i f_i P_i and the z-loss mean(logsumexp(logits)^2),
scaled by ``aux_loss_coeff`` / ``z_loss_coeff``; padding tokens
(``ctx.mask_T`` False) are excluded from both. Statistics every router reports:
routing entropy (nats) and experts per token.

Legend: T tokens, D features, E experts, K = top_k.
"""
import torch

from megatron_mole.routing.base import Router, Routing, register_router
from megatron_mole.routing.losses import assignment_counts, load_balancing_loss, z_loss


def _is_bool(v):
    return isinstance(v, bool)


def _in_unit(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


@register_router("topk")
class TopKRouter(Router):
    ARGS = {"jitter": (0.0, _in_unit, "a number in [0, 1)"),
            "renormalize": (False, _is_bool, "true or false")}

    def router_input(self, x_TD, ctx):
        """The input the gate sees: jittered in training when asked."""
        eps = self.arg("jitter")
        if eps and ctx is not None and ctx.training:
            noise = torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            return x_TD * noise
        return x_TD

    def forward(self, x_TD, ctx=None, reduce_logits=None) -> Routing:
        logits_TE = self.logits(self.router_input(x_TD, ctx), reduce_logits)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        gates_TK, expert_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.arg("renormalize"):
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True)
        routing = Routing(expert_idx_TK=expert_idx_TK, gates_TK=gates_TK, probs_TE=probs_TE,
                          logits_TE=logits_TE, mask_T=None if ctx is None else ctx.mask_T)
        add_standard_aux_losses(routing, self.cfg, self, ctx)
        return routing


def _masked_mean(values_T, mask_T):
    if mask_T is None:
        return values_T.mean() if values_T.numel() else values_T.sum()
    weight = mask_T.to(values_T.dtype)
    return (values_T * weight).sum() / weight.sum().clamp(min=1.0)


def add_standard_aux_losses(routing: Routing, cfg, router=None, ctx=None) -> None:
    """Add the balance and z losses (when their coefficients are non-zero) to
    ``routing.aux_losses`` (scaled) and ``stats`` (unscaled), and the statistics
    every router reports; other routers reuse this or its parts. Unused slots
    (``valid_TK`` False) and padding are left out."""
    add_balance_loss(routing, cfg, router, ctx)
    add_z_loss(routing, cfg)
    add_routing_stats(routing)


def add_balance_loss(routing: Routing, cfg, router=None, ctx=None) -> None:
    """Switch/Mixtral balance loss; with ``router``, its expert fractions come from
    ``router.balance_fractions`` (its ``MoLEConfig.balance`` scope)."""
    if cfg.aux_loss_coeff <= 0:
        return
    f_E = None
    if router is not None:
        counts_E, used = assignment_counts(routing.expert_idx_TK, routing.probs_TE.shape[1], routing.mask_T,
                                           routing.valid_TK)
        f_E = router.balance_fractions(counts_E, used, ctx is not None and ctx.training)
    lb = load_balancing_loss(routing.probs_TE, routing.expert_idx_TK, routing.mask_T, routing.valid_TK, f_E)
    routing.stats["load_balance"] = lb.detach()
    routing.aux_losses["load_balance"] = cfg.aux_loss_coeff * lb


def add_z_loss(routing: Routing, cfg) -> None:
    """ST-MoE z-loss on the routing's logits."""
    if cfg.z_loss_coeff <= 0:
        return
    z = z_loss(routing.logits_TE, routing.mask_T)
    routing.stats["z_loss"] = z.detach()
    routing.aux_losses["z_loss"] = cfg.z_loss_coeff * z


def add_routing_stats(routing: Routing) -> None:
    """What every router reports: ``entropy`` (mean routing entropy in nats) and
    ``experts_per_token``."""
    with torch.no_grad():
        probs = routing.probs_TE
        routing.stats["entropy"] = _masked_mean(-(probs * probs.clamp(min=1e-30).log()).sum(-1), routing.mask_T)
        used_T = (torch.full(probs.shape[:1], float(routing.expert_idx_TK.shape[1]), device=probs.device)
                  if routing.valid_TK is None else routing.valid_TK.sum(-1).float())
        routing.stats["experts_per_token"] = _masked_mean(used_T, routing.mask_T)
