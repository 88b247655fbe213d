"""Router base class, the routing result and the registry.

Legend: T tokens, D router input features (local shard under a row-parallel
base), E experts, K = top_k.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn

ROUTERS: Dict[str, type] = {}


def register_router(name: str):
    def deco(cls):
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered ({ROUTERS[name].__name__})")
        ROUTERS[name] = cls
        cls.registry_name = name
        return cls
    return deco


@dataclass
class Routing:
    """What a router decided for T tokens.

    ``expert_idx_TK`` int64 chosen experts; ``gates_TK`` fp32 weights of the
    chosen experts; ``probs_TE`` / ``logits_TE`` fp32; ``aux_loss`` the scaled
    sum of the auxiliary losses (a 0-dim tensor carrying grad to the router) and
    ``stats`` its detached unscaled parts for logging.
    """
    expert_idx_TK: torch.Tensor
    gates_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    aux_loss: Optional[torch.Tensor] = None
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


class Router(nn.Module):
    """A linear fp32 gate ``W_g`` of shape [E, D] (no bias) plus a selection rule.

    ``weight`` is created in fp32 whatever the model dtype: routing decisions
    are taken in fp32 so that they do not flip with the compute precision. A
    model cast after construction (``model.to(torch.bfloat16)``, Megatron's
    ``Float16Module``) casts this weight too; the logits still use it upcast to
    fp32 (bf16-rounded values, fp32 math), so the forward works at any dtype.
    """

    registry_name = "?"

    def __init__(self, in_features: int, cfg, device=None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, in_features, dtype=torch.float32,
                                               device=device))

    @classmethod
    def check_args(cls, router_args: dict, cfg) -> None:
        """Validate ``cfg.router_args`` for this router (errors name the key)."""
        if router_args:
            raise ValueError(f"MoLEConfig.router_args={router_args!r}: router {cls.registry_name!r} "
                             f"takes no arguments")

    def logits(self, x_TD: torch.Tensor, reduce_logits: Optional[Callable] = None) -> torch.Tensor:
        # .float() on both: a no-op for fp32, an upcast when the model was cast to bf16/fp16 later
        # (F.linear refuses mixed dtypes); the gradient flows back to the weight in its own dtype.
        logits_TE = torch.nn.functional.linear(x_TD.float(), self.weight.float())
        # Under a row-parallel base each rank holds a slice of D: the partial
        # logits are summed over tensor-parallel ranks by the caller's function.
        return reduce_logits(logits_TE) if reduce_logits is not None else logits_TE

    def forward(self, x_TD, reduce_logits=None, mask_T=None) -> Routing:  # pragma: no cover
        raise NotImplementedError


def build_router(in_features: int, cfg, device=None) -> Router:
    return ROUTERS[cfg.router](in_features, cfg, device=device)
