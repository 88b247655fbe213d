"""Token dispatch to LoRA experts: ``permute`` tokens into expert-sorted rows,
``combine`` expert outputs back (autograd through index_select).

``local`` keeps every expert on this rank; the expert-parallel all-to-all
dispatcher provides the same interface (see local.py's docstring).
"""
from megatron_mole.dispatch.local import DISPATCHERS, DispatchPlan, LocalDispatcher, build_dispatcher

__all__ = ["DISPATCHERS", "DispatchPlan", "LocalDispatcher", "build_dispatcher"]
