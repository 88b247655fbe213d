"""The routing contract: routers (a registry by name), their context and their result.

A router maps token features ``x_TD`` plus a :class:`RoutingContext` to a
:class:`Routing`: for every token a *variable* number of (expert, gate) pairs,
given as ``expert_idx_TK`` / ``gates_TK`` of a fixed width K with a validity
mask ``valid_TK`` (None: every slot is used). Slot 0 is always valid (every
token reaches at least one expert); a router that picks fewer than K experts
for a token marks the unused slots invalid, and dispatch, grouped compute and
combine skip them (forward and backward, local and all-to-all), so a token
costs the expert rows it uses, not K.

A router owns its parameters (:meth:`Router.tensor_specs` lists them: a router
with several matrices needs no edit elsewhere: export, TP placement, init and
the memory estimate read that list), its named auxiliary losses
(``Routing.aux_losses``: scaled, carrying gradient) and its statistics
(``Routing.stats``: detached).

Plain PyTorch, no Megatron import: the Hugging Face inference modules in
``megatron_mole.hf`` use these very classes. Tensor-parallel plumbing reaches
the router as a ``reduce_logits`` function so routing stays layout-agnostic.

Legend: T tokens, D router input features (local shard under a row-parallel
base), E experts, K slots per token.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron_mole.routing.losses import is_recomputing

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
class RoutingContext:
    """What a router may know about the tokens beyond their features.

    Rows are s-major (Megatron's [s, b] layout flattened: row = s_idx * batch +
    b_idx). ``mask_T``: True for real tokens (padding is left out of losses and
    statistics). ``segment_ids_T``: packed-sequence ids (0 = padding).
    ``layer``: the global 0-based layer number. ``condition``: a tensor supplied
    by the model (``megatron_mole.layers.context``) for context-conditioned
    routers.
    """
    layer: Optional[int] = None
    training: bool = False
    seq_len: Optional[int] = None
    batch: Optional[int] = None
    mask_T: Optional[torch.Tensor] = None
    segment_ids_T: Optional[torch.Tensor] = None
    condition: Optional[torch.Tensor] = None


@dataclass
class Routing:
    """What a router decided for T tokens.

    ``expert_idx_TK`` int64 experts; ``gates_TK`` fp32 weights of the chosen
    experts; ``valid_TK`` bool (None: all slots used; slot 0 always valid);
    ``probs_TE`` / ``logits_TE`` fp32; ``aux_losses`` named scaled losses (0-dim
    tensors carrying grad to the router); ``stats`` detached values for logging;
    ``mask_T`` the padding mask the router used.
    """
    expert_idx_TK: torch.Tensor
    gates_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor
    valid_TK: Optional[torch.Tensor] = None
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    mask_T: Optional[torch.Tensor] = None

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """Sum of the named auxiliary losses (None when there are none)."""
        total = None
        for value in self.aux_losses.values():
            total = value if total is None else total + value
        return total

    def logged_stats(self) -> Dict[str, torch.Tensor]:
        """``stats`` plus ``aux_loss`` (the detached sum of the scaled losses): what
        the wrappers record for the training log."""
        out = dict(self.stats)
        if self.aux_losses:
            out["aux_loss"] = self.aux_loss.detach()
        return out

    def masked_gates(self) -> torch.Tensor:
        """``gates_TK`` with unused slots at 0."""
        if self.valid_TK is None:
            return self.gates_TK
        return self.gates_TK * self.valid_TK.to(self.gates_TK.dtype)

    def renormalised_gates(self) -> torch.Tensor:
        """The used gates of each token rescaled to sum 1 (unused slots 0)."""
        gates_TK = self.masked_gates()
        return gates_TK / gates_TK.sum(-1, keepdim=True)


@dataclass(frozen=True)
class RouterTensor:
    """One router parameter: ``name`` below ``router.``, its full shape, the dim
    holding the input features (split like the input under a row-parallel
    base; None: not input-sized), its init (experts/init.py kinds) and fan-in;
    ``trainable=False``: router state saved with the adapter but not optimised."""
    name: str
    shape: Tuple[int, ...]
    in_dim: Optional[int]
    init: str = "kaiming"
    fan_in: int = 0
    trainable: bool = True


class Router(nn.Module):
    """Base router: fp32 parameters from :meth:`tensor_specs` plus a selection rule.

    The default parameters are one linear gate ``weight`` [E, D] (no bias).
    Parameters are fp32 whatever the model dtype, and :meth:`logits` computes in
    fp32 from an fp32 view of them, so routing decisions do not flip with the
    compute precision (also when a model is cast to bf16 after loading).
    """

    registry_name = "?"
    # router_args this router accepts: name -> (default, check(value) -> bool, what a valid value is)
    ARGS: Dict[str, Tuple[object, Callable, str]] = {}

    def __init__(self, in_features: int, cfg, device=None):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.in_features = in_features
        for t in self.all_tensor_specs(in_features, cfg):
            self.register_parameter(t.name, nn.Parameter(
                torch.zeros(t.shape, dtype=torch.float32, device=device), requires_grad=t.trainable))
        if cfg.balance == "global":  # this step's statistics (see ``balance_fractions``)
            self.register_buffer("_balance_sum", torch.zeros(cfg.num_experts, device=device), persistent=False)
            self.register_buffer("_balance_n", torch.zeros((), device=device), persistent=False)

    @classmethod
    def all_tensor_specs(cls, in_features: int, cfg) -> List[RouterTensor]:
        """``tensor_specs`` plus the state every router keeps: under ``balance="global"``
        the global expert fractions of the previous step (``balance_fraction`` [E])."""
        specs = list(cls.tensor_specs(in_features, cfg))
        if cfg.balance == "global":
            specs.append(RouterTensor("balance_fraction", (cfg.num_experts,), in_dim=None, init="mean",
                                      trainable=False))
        return specs

    def balance_fractions(self, sum_E: torch.Tensor, total: torch.Tensor, training: bool) -> torch.Tensor:
        """The f of the balance loss from this forward's per-expert ``sum_E`` over
        ``total`` (no gradient). ``balance="micro_batch"``: their ratio. ``"global"``:
        the fractions of the previous step's global batch (uniform before the first
        update), while a training forward adds its statistics to this step's, which
        ``megatron_mole.model.update_global_balance`` reduces over data-parallel
        ranks after each optimizer step."""
        sum_E, total = sum_E.detach().float(), total.detach().float()
        if self.cfg.balance != "global":
            return sum_E / total.clamp(min=1.0)
        if training and not is_recomputing():  # a recompute replay counted once
            self._balance_sum.add_(sum_E)
            self._balance_n.add_(total)
        return self.balance_fraction.detach().float()

    @classmethod
    def tensor_specs(cls, in_features: int, cfg) -> List[RouterTensor]:
        """The router's parameters (full shapes; ``in_features`` full too)."""
        return [RouterTensor("weight", (cfg.num_experts, in_features), in_dim=1, fan_in=in_features)]

    @classmethod
    def check_args(cls, router_args: dict, cfg) -> None:
        """Validate ``cfg.router_args`` against ``ARGS`` (errors name the key)."""
        unknown = sorted(set(router_args) - set(cls.ARGS))
        if unknown:
            known = f"known: {sorted(cls.ARGS)}" if cls.ARGS else "it takes no arguments"
            raise ValueError(f"MoLEConfig.router_args={router_args!r}: router {cls.registry_name!r} does not "
                             f"take {unknown} ({known})")
        for name, value in router_args.items():
            _, ok, what = cls.ARGS[name]
            if not ok(value):
                raise ValueError(f"MoLEConfig.router_args={router_args!r}: router {cls.registry_name!r}: "
                                 f"{name}={value!r} must be {what}")

    def arg(self, name: str):
        """``cfg.router_args[name]``, or its default."""
        return self.cfg.router_args.get(name, self.ARGS[name][0])

    def linear_logits(self, x_TD: torch.Tensor, weight: torch.Tensor,
                      reduce_logits: Optional[Callable] = None) -> torch.Tensor:
        """fp32 ``x W^T``; under a row-parallel base each rank holds a slice of D
        and the caller's ``reduce_logits`` sums the partial logits over TP."""
        logits = torch.nn.functional.linear(x_TD.float(), weight.float())
        return reduce_logits(logits) if reduce_logits is not None else logits

    def logits(self, x_TD: torch.Tensor, reduce_logits: Optional[Callable] = None) -> torch.Tensor:
        return self.linear_logits(x_TD, self.weight, reduce_logits)

    def forward(self, x_TD, ctx: Optional[RoutingContext] = None, reduce_logits=None) -> Routing:
        raise NotImplementedError  # pragma: no cover


def build_router(in_features: int, cfg, device=None) -> Router:
    return ROUTERS[cfg.router](in_features, cfg, device=device)
