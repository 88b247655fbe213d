"""What every adapter wrapper shares: its adapter tensors (bound from its kind's
spec, layers/specs.py), layout-independent init, gather to full tensors and load
from full tensors.

Export names are ``{prefix}.{name}`` where ``prefix`` is the wrapped module's
path with the global layer index (set by ``apply_mole``) and ``name`` comes from
the spec (README "Adapter tensor names").

Expert tensors are split along dim 0 over expert parallelism before the TP
split (dispatch/sharding.py).

Legend: E experts, R rank, I in features, O out features.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from megatron_mole.dispatch.sharding import REPLICATED, ExpertSharding
from megatron_mole.experts.init import full_init
from megatron_mole.layers.specs import TensorSpec, UnitDims, kind_of


@dataclass
class AdapterTensor:
    suffix: str                    # export name below the wrapper's prefix
    param: nn.Parameter
    placement: object              # layers.parallel placement that shards it
    split_dim: Optional[int]       # dim split over TP, None = replicated
    init: str                      # "kaiming" | "zeros"
    fan_in: int                    # full fan-in for the kaiming bound
    experts: ExpertSharding = REPLICATED  # dim 0 split over expert parallelism
    spec: Optional[TensorSpec] = None

    def full_shape(self) -> Tuple[int, ...]:
        shape = list(self.param.shape)
        if self.split_dim is not None:
            shape[self.split_dim] *= self.placement.tp_size
        shape[0] *= self.experts.size
        return tuple(shape)


class AdapterWrapper(nn.Module):
    """Base of the wrappers. A subclass names its ``kind`` (a registered
    AdapterKind), provides ``unit_dims()`` (full sizes) and ``placement_of(linear)``,
    and maps spec tensor names to its attribute paths by ``param_rewrites``
    (export-name prefix -> attribute-path prefix)."""

    kind: str = "?"
    adapter_prefix: str = ""
    sharding: ExpertSharding = REPLICATED
    param_rewrites: Dict[str, str] = {}

    def unit_dims(self) -> UnitDims:  # pragma: no cover
        raise NotImplementedError

    def placement_of(self, linear: Optional[str]):  # pragma: no cover
        raise NotImplementedError

    def param_slot(self, name: str):
        """(owner module, attribute) holding spec tensor ``name``; None when the
        owner is absent (a part the targets left out)."""
        for old, new in self.param_rewrites.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        owner_path, _, attr = name.rpartition(".")
        owner = self
        for part in owner_path.split(".") if owner_path else ():
            owner = getattr(owner, part, None)
            if owner is None:
                return None
        return owner, attr

    def param_of(self, name: str) -> Optional[nn.Parameter]:
        slot = self.param_slot(name)
        return None if slot is None else getattr(*slot)

    def tie_param(self, name: str, param: nn.Parameter) -> None:
        """Make spec tensor ``name`` this very parameter (tensors one Megatron
        tensor stands behind on several Hugging Face linears)."""
        owner, attr = self.param_slot(name)
        setattr(owner, attr, param)

    def adapter_tensors(self) -> List[AdapterTensor]:
        kind = kind_of(self.kind)
        out = []
        for t in kind.tensors(self.cfg, self.unit_dims()):
            place = self.placement_of(t.linear if t.linear is not None else kind.input_linear)
            param = self.param_of(t.name)
            if param is None:  # an optional part the targets left out (e.g. fc2 of an MLP)
                continue
            sharding = self.sharding if t.experts else REPLICATED
            at = AdapterTensor(t.name, param, place, t.split_dim(place.kind), t.init, t.fan_in, sharding, t)
            if at.full_shape() != tuple(t.shape):
                raise RuntimeError(f"{self.adapter_name(at)}: parameter of local shape {list(param.shape)} "
                                   f"does not shard the spec's full shape {list(t.shape)}")
            out.append(at)
        return out

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


def mark_parallel_attributes(wrapper: AdapterWrapper) -> None:
    """TP-split adapter params carry Megatron's tensor-parallel attributes so
    grad-norm clipping counts them on every TP rank (replicated ones once);
    expert-parallel ones Megatron's ``allreduce=False``, so its DDP reduces them
    over the expert-data-parallel group."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    for t in wrapper.adapter_tensors():
        if t.experts.size > 1:
            t.param.allreduce = False
        if t.split_dim is not None and t.placement.tp_size > 1:
            stride = t.placement.stride if t.placement.kind == "column" else 1
            set_tensor_model_parallel_attributes(t.param, True, t.split_dim, stride)
