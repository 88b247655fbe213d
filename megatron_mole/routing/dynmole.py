"""The ``"dynmole"`` router: DynMoLE's Tsallis-entropy hybrid routing.

With p = softmax(W_g x) (fp32) over N experts and the normalised Tsallis entropy

    S_q(p) = [(1 - sum_i p_i^q) / (q - 1)] / [(1 - N^(1-q)) / (q - 1)]  in [0, 1],

a token whose S_q > ``threshold`` (strictly) goes to **all** experts; any other token
to the top-p set: experts sorted by p, kept while the cumulative probability is
<= ``top_p`` (the expert that crosses ``top_p`` is left out, as DynMoLE's public code
does; nucleus sampling would keep it), and at least ``top_k`` of them (DynMoLE's
keep_top_k). Gates are w = p * mask, not renormalised.

Loss: ``entropy_loss_coeff`` * mean(S_q) (it has a gradient: it sharpens uncertain
routers) + ``aux_loss_coeff`` * N sum_i f_i P_i, where, as in DynMoLE's code, f_i is
the mean of the masked weights w_i (here without gradient, like the Switch count it
replaces; over the global batch under ``MoLEConfig.balance="global"``) and P_i the
mean probability; z-loss as every router. Padding is left out.

Defaults are the paper's: q = 1.1, threshold = 0.9, top_p = 0.75, entropy_loss_coeff
= 0.01; its template also sets top_k (keep_top_k) = 2, aux_loss_coeff = 0.001, six
experts, rank 24 and one router per adapted linear (``expert_scope="linear"``).
DynMoLE's public HEAD calls ``tsallis_entropy(p=..., a=...)`` against a parameter
named ``q``: the formula above is the paper's.

Statistics: ``tsallis_entropy`` (mean S_q) and ``dense_fraction`` (tokens sent to all
experts), beside the entropy and experts per token every router reports.

Legend: T tokens, E = N experts.
"""
import torch

from megatron_mole.routing.base import Router, Routing, register_router
from megatron_mole.routing.topk import _masked_mean, add_routing_stats, add_z_loss


def _number(lo, hi, lo_open=False, hi_open=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return ok


def tsallis_entropy(probs_TE: torch.Tensor, q: float) -> torch.Tensor:
    """Normalised Tsallis entropy S_q of each row (1 for the uniform distribution)."""
    num_experts = probs_TE.shape[-1]
    if num_experts == 1:
        return probs_TE.new_zeros(probs_TE.shape[0])
    raw = (1.0 - probs_TE.pow(q).sum(-1)) / (q - 1.0)
    return raw / ((1.0 - num_experts ** (1.0 - q)) / (q - 1.0))


def top_p_mask(sorted_probs_TE: torch.Tensor, top_p: float, keep: int) -> torch.Tensor:
    """Slots (experts sorted by probability) kept by DynMoLE's rule: cumulative <= top_p,
    then at least ``keep``."""
    mask = torch.cumsum(sorted_probs_TE, dim=-1) <= top_p
    mask[:, :keep] = True
    return mask


@register_router("dynmole")
class DynMoLERouter(Router):
    ARGS = {"q": (1.1, _number(1.0, float("inf"), lo_open=True, hi_open=True), "a number > 1"),
            "threshold": (0.9, _number(0.0, float("inf")), "a number >= 0 (>= 1: never dense)"),
            "top_p": (0.75, _number(0.0, 1.0, lo_open=True), "a number in (0, 1]"),
            "entropy_loss_coeff": (0.01, _number(0.0, float("inf")), "a number >= 0")}

    def forward(self, x_TD, ctx=None, reduce_logits=None) -> Routing:
        logits_TE = self.logits(x_TD, reduce_logits)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        entropy_T = tsallis_entropy(probs_TE, self.arg("q"))
        sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True)
        with torch.no_grad():
            dense_T = entropy_T > self.arg("threshold")
            valid_TE = top_p_mask(sorted_TE, self.arg("top_p"), self.top_k) | dense_T[:, None]
        mask_T = None if ctx is None else ctx.mask_T
        routing = Routing(expert_idx_TK=order_TE, gates_TK=sorted_TE, probs_TE=probs_TE, logits_TE=logits_TE,
                          valid_TK=valid_TE, mask_T=mask_T)
        cfg = self.cfg
        if cfg.aux_loss_coeff > 0:
            lb = dynmole_balance_loss(probs_TE, order_TE, sorted_TE, valid_TE, mask_T, self, ctx)
            routing.stats["load_balance"] = lb.detach()
            routing.aux_losses["load_balance"] = cfg.aux_loss_coeff * lb
        add_z_loss(routing, cfg)
        mean_entropy = _masked_mean(entropy_T, mask_T)
        if self.arg("entropy_loss_coeff") > 0:
            routing.aux_losses["tsallis_entropy"] = self.arg("entropy_loss_coeff") * mean_entropy
        routing.stats["tsallis_entropy"] = mean_entropy.detach()
        routing.stats["dense_fraction"] = _masked_mean(dense_T.float(), mask_T)
        add_routing_stats(routing)
        return routing


def dynmole_balance_loss(probs_TE, order_TE, sorted_TE, valid_TE, mask_T=None, router=None, ctx=None):
    """N * sum_i f_i P_i with f_i the mean masked weight of expert i (no gradient;
    over the global batch of the previous step when ``router`` says so)."""
    num_tokens, num_experts = probs_TE.shape
    weight_T = (torch.ones(num_tokens, device=probs_TE.device) if mask_T is None
                else mask_T.to(probs_TE.dtype))
    n = weight_T.sum().clamp(min=1.0)
    with torch.no_grad():
        w_TE = torch.zeros_like(probs_TE).scatter(1, order_TE, sorted_TE * valid_TE.to(sorted_TE.dtype))
        w_sum_E = (w_TE * weight_T[:, None]).sum(0)
    if router is not None:
        f_E = router.balance_fractions(w_sum_E, weight_T.sum(), ctx is not None and ctx.training)
    else:
        f_E = w_sum_E / n
    p_E = (probs_TE * weight_T[:, None]).sum(0) / n
    return num_experts * (f_E * p_E).sum()
