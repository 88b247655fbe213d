"""Token dispatch to LoRA experts: ``permute`` tokens into expert-sorted rows,
``combine`` expert outputs back (autograd through index_select / all-to-all).

``LocalDispatcher`` keeps every expert on this rank; ``AllToAllDispatcher``
reaches the experts of an expert-parallel group with the same interface;
``cost`` models which of the two moves fewer bytes. Which one a layer uses is
decided by layers/expert_parallel.py.
"""
from megatron_mole.dispatch.alltoall import AllToAllDispatcher, AllToAllPlan
from megatron_mole.dispatch.local import DispatchPlan, LocalDispatcher

__all__ = ["AllToAllDispatcher", "AllToAllPlan", "DispatchPlan", "LocalDispatcher"]
