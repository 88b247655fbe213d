"""What every adapter wrapper shares: its list of adapter tensors (export name,
parameter, TP split, init rule), layout-independent init, gather to full
tensors and load from full tensors.

Export names are ``{prefix}.{suffix}`` where ``prefix`` is the wrapped
module's path with the global layer index (set by ``apply_mole``) and
``suffix`` is fixed per wrapper (see README "Adapter tensor names").

Expert tensors (``experts`` set) are split along dim 0 over expert
parallelism before the TP split (layers/expert_parallel.py).

Legend: E experts, R rank, I in features, O out features.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron_mole.experts.init import full_init
from megatron_mole.layers.expert_parallel import REPLICATED, ExpertSharding


@dataclass
class AdapterTensor:
    suffix: str                    # export name below the wrapper's prefix
    param: nn.Parameter
    placement: object              # layers.parallel placement that shards it
    split_dim: Optional[int]       # dim split over TP, None = replicated
    init: str                      # "kaiming" | "zeros"
    fan_in: int                    # full fan-in for the kaiming bound
    experts: ExpertSharding = REPLICATED  # dim 0 split over expert parallelism

    def full_shape(self) -> Tuple[int, ...]:
        shape = list(self.param.shape)
        if self.split_dim is not None:
            shape[self.split_dim] *= self.placement.tp_size
        shape[0] *= self.experts.size
        return tuple(shape)


class AdapterWrapper(nn.Module):
    """Base of the wrappers; subclasses fill ``adapter_tensors``."""

    adapter_prefix: str = ""

    def adapter_tensors(self) -> List[AdapterTensor]:  # pragma: no cover
        raise NotImplementedError

    def adapter_name(self, t: AdapterTensor) -> str:
        return f"{self.adapter_prefix}.{t.suffix}" if self.adapter_prefix else t.suffix

    @torch.no_grad()
    def init_adapters(self, seed: int) -> None:
        for t in self.adapter_tensors():
            name = self.adapter_name(t)
            full = full_init(name, t.full_shape(), t.init, t.fan_in, seed)
            self._copy_full(t, full)

    def _copy_full(self, t: AdapterTensor, full: torch.Tensor) -> None:
        local = t.experts.shard(full)
        local = local if t.split_dim is None else t.placement.shard(local, t.split_dim)
        t.param.data.copy_(local.to(device=t.param.device, dtype=t.param.dtype))

    @torch.no_grad()
    def full_adapter_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for t in self.adapter_tensors():
            local = t.param.detach()
            full = local if t.split_dim is None else t.placement.unshard(local, t.split_dim)
            out[self.adapter_name(t)] = t.experts.unshard(full).clone()
        return out

    @torch.no_grad()
    def load_full_adapter_tensors(self, sd: Dict[str, torch.Tensor], errors: List[str]) -> None:
        for t in self.adapter_tensors():
            name = self.adapter_name(t)
            if name not in sd:
                errors.append(f"missing tensor {name!r} (shape {list(t.full_shape())})")
                continue
            if tuple(sd[name].shape) != t.full_shape():
                errors.append(f"tensor {name!r} has shape {list(sd[name].shape)}, "
                              f"expected {list(t.full_shape())}")
                continue
            self._copy_full(t, sd[name])
