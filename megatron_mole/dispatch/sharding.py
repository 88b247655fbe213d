"""Where LoRA experts live: sharded over the expert-parallel group, or replicated.

``MoLEConfig.dispatch`` decides, once per model, at ``apply_mole`` time:

* ``"alltoall"``: with Megatron's expert-model-parallel size ``ep > 1``, each
  EP rank owns ``E / ep`` experts of every MoLE layer (global id = local id +
  ep_rank * E/ep) and tokens reach them by all-to-all
  (:class:`~megatron_mole.dispatch.alltoall.AllToAllDispatcher`, behind the seam of
  dispatch/seam.py). Expert params
  carry Megatron's ``allreduce=False`` marker, so Megatron's DDP reduces them over
  the expert-data-parallel group (scaled by 1/dp, as Megatron does for MoE
  experts). Experts keep the base's tensor parallelism (expert TP = TP): the EP
  group joins ranks of equal TP rank, so the TP peers of an expert receive the
  same rows and the TP collectives of the adapter line up.
* ``"replicated"`` / ``"local"``: every rank holds every expert; their grads
  reduce over the data-parallel group like any other param.
* ``"auto"``: the cost model of :mod:`megatron_mole.dispatch.cost` with
  ``MoLEConfig.dispatch_tokens_per_rank`` tokens per rank and step.

Legend: E experts, L = E / ep local experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_mole.dispatch.cost import choose_dispatch


@dataclass(frozen=True)
class ExpertSharding:
    """How dim 0 (experts) of expert tensors is split over the EP group."""

    size: int = 1
    rank: int = 0
    group: Any = None

    def num_local(self, num_experts: int) -> int:
        return num_experts // self.size

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        return full.chunk(self.size, 0)[self.rank] if self.size > 1 else full

    def unshard(self, local: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local.contiguous(), group=self.group)
        return torch.cat(pieces, 0)


REPLICATED = ExpertSharding()


def _ep_group():
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1, 0, 1
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 1, 0, 1
    group = ps.get_expert_model_parallel_group()
    return group, dist.get_world_size(group), dist.get_rank(group), ps.get_data_parallel_world_size()


def resolve_dispatch(cfg, linears, params_per_expert: Optional[int] = None) -> str:
    """The dispatch mode of one MoLE unit: "alltoall" or "replicated".
    ``linears``: the (d_in, d_out) of its linears; ``params_per_expert`` from its spec."""
    _, ep, _, dp = _ep_group()
    mode = cfg.dispatch
    if ep == 1 or mode in ("local", "replicated"):
        return "replicated"
    if cfg.num_experts % ep:
        raise ValueError(
            f"MoLEConfig.num_experts={cfg.num_experts} is not divisible by the expert-parallel "
            f"size {ep} (dispatch={mode!r}); use dispatch='replicated' or another ep"
        )
    if mode == "alltoall":
        return "alltoall"
    chosen, _, _ = choose_dispatch(
        cfg.dispatch_tokens_per_rank, cfg.top_k, cfg.num_experts, cfg.rank, linears, ep, dp,
        params_per_expert=params_per_expert)
    return chosen


def expert_sharding(cfg, linears, params_per_expert: Optional[int] = None) -> ExpertSharding:
    """The sharding of one MoLE unit's experts; ``linears`` lists its (d_in, d_out)."""
    if resolve_dispatch(cfg, linears, params_per_expert) != "alltoall":
        return REPLICATED
    group, ep, ep_rank, _ = _ep_group()
    return ExpertSharding(ep, ep_rank, group)
