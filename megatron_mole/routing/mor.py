"""The ``"mor"`` router: Mixture of Routers.

J sub-routers W_j [E, D] and a learnable main router W_m [J, D] (no biases):

    p = sum_j softmax(W_m x)_j * softmax(W_j x)        (a mixture of probabilities)

then top-k with gates p (raw, as ``topk``). We read the method as mixing the
sub-routers' probabilities, not their logits (its code is not public; the paper
reports J = 2 best: the default ``num_sub_routers``). With one sub-router the main
router's softmax is exactly 1 and this is ``topk``. Balance loss on p; the z-loss is
the mean of the sub-routers' and the main router's. Tensors: ``router.weight``
[J, E, D] and ``router.main_weight`` [J, D] (split along D under a row-parallel
base; all logits are reduced over TP in one call).

Legend: T tokens, D features, E experts, J sub-routers, K = top_k.
"""
import torch

from megatron_mole.routing.base import Router, RouterTensor, Routing, register_router
from megatron_mole.routing.losses import z_loss
from megatron_mole.routing.topk import add_balance_loss, add_routing_stats


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@register_router("mor")
class MixtureOfRouters(Router):
    ARGS = {"num_sub_routers": (2, _positive_int, "an int >= 1")}

    @classmethod
    def tensor_specs(cls, in_features, cfg):
        j = cfg.router_args.get("num_sub_routers", cls.ARGS["num_sub_routers"][0])
        return [RouterTensor("weight", (j, cfg.num_experts, in_features), in_dim=2, fan_in=in_features),
                RouterTensor("main_weight", (j, in_features), in_dim=1, fan_in=in_features)]

    def forward(self, x_TD, ctx=None, reduce_logits=None) -> Routing:
        j, e = self.weight.shape[:2]
        stacked = torch.cat([self.weight.reshape(j * e, -1), self.main_weight])
        logits = self.linear_logits(x_TD, stacked, reduce_logits)  # one TP reduction for all
        sub_TJE = logits[:, : j * e].reshape(-1, j, e)
        main_TJ = logits[:, j * e:]
        probs_TE = (torch.softmax(main_TJ, -1).unsqueeze(-1) * torch.softmax(sub_TJE, -1)).sum(1)
        gates_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        mask_T = None if ctx is None else ctx.mask_T
        # logits_TE: the sub-routers' mean (for logging; the z-loss uses each router's own)
        routing = Routing(idx_TK, gates_TK, probs_TE, sub_TJE.mean(1), mask_T=mask_T)
        add_balance_loss(routing, self.cfg, self, ctx)
        add_routing_stats(routing)
        if self.cfg.z_loss_coeff > 0:
            parts = [z_loss(sub_TJE[:, i], mask_T) for i in range(j)] + [z_loss(main_TJ, mask_T)]
            z = torch.stack(parts).mean()
            routing.stats["z_loss"] = z.detach()
            routing.aux_losses["z_loss"] = self.cfg.z_loss_coeff * z
        return routing
