"""Token dispatch to LoRA experts: ``permute`` tokens into expert-sorted rows,
``combine`` expert outputs back (autograd through index_select / all-to-all).

``seam.ExpertDispatch`` is the one interface wrappers use. Behind it:
``LocalDispatcher`` keeps every expert on this rank; ``AllToAllDispatcher``
reaches the experts of an expert-parallel group with the same interface;
``tp_split`` splits that dispatch over the TP ranks holding the same tokens;
``sharding`` decides where a unit's experts live, with ``cost`` modelling which
mode moves fewer bytes.
"""
from megatron_mole.dispatch.alltoall import AllToAllDispatcher, AllToAllPlan
from megatron_mole.dispatch.local import DispatchPlan, LocalDispatcher
from megatron_mole.dispatch.seam import DispatchHandle, ExpertDispatch, build_dispatch

__all__ = ["AllToAllDispatcher", "AllToAllPlan", "DispatchHandle", "DispatchPlan", "ExpertDispatch",
           "LocalDispatcher", "build_dispatch"]
