"""Routers (a registry by name) and the auxiliary losses of MoLE layers.

Plain PyTorch, no Megatron import: the Hugging Face inference modules in
``megatron_mole.hf`` use these very classes. A router maps token features
``x_TD`` and a :class:`RoutingContext` to a :class:`Routing` (a variable number
of (expert, gate) pairs per token, the full probabilities, named auxiliary
losses and statistics; routing/base.py states the contract); tensor-parallel
plumbing is passed in by the caller as a ``reduce_logits`` function so routing
stays layout-agnostic.

Add a router with::

    @register_router("name")
    class MyRouter(Router): ...
"""
from megatron_mole.routing.base import (ROUTERS, Router, RouterTensor, Routing, RoutingContext, build_router,
                                        register_router)
from megatron_mole.routing.losses import (
    AUX_LOSS_TRACKER,
    AuxLossScaler,
    AuxLossTracker,
    attach_aux_loss,
    is_recomputing,
    load_balancing_loss,
    recomputing,
    set_aux_loss_scale,
    z_loss,
)
from megatron_mole.routing import dynmole, gw, mor, topk  # noqa: F401  (registrations)

__all__ = [
    "ROUTERS", "Router", "RouterTensor", "Routing", "RoutingContext", "build_router", "register_router", "AUX_LOSS_TRACKER",
    "AuxLossScaler", "AuxLossTracker", "attach_aux_loss", "is_recomputing", "load_balancing_loss", "recomputing",
    "set_aux_loss_scale", "z_loss",
]
