"""Optimizer state of a training checkpoint, resharded by Megatron-core's own dist_checkpointing.

The adapter parameters get layout-independent ``ShardedTensor`` descriptions
(:func:`adapter_sharded_state_dict`): the key is the adapter's global export name
(global layer id), the global shape is the full tensor (all experts, TP unsplit),
and the offsets say which block this rank holds: experts split along dim 0 over
the expert-parallel group (rank r holds experts [r*L, (r+1)*L)), then the TP split
of ``split_dim``. A column base with partition stride s (SwiGLU fc1: [gate; up])
gives each TP rank s non-adjacent blocks, so such a tensor is a
``ShardedTensorFactory`` that chunks it into its s blocks, as Megatron's own
``apply_swiglu_sharded_factory`` does for the base fc1 weight.

From that description Megatron's optimizers build their own sharded state
(``sharded_state_dict(model_sharded_state_dict)``): Adam moments and fp32 main
params keyed ``optimizer.state.{exp_avg,exp_avg_sq,param|fp32_param}.NAME``, the
distributed optimizer in its ``fully_reshardable`` format (each param's state as a
full-shape tensor, whatever the DP sharding). ``dist_checkpointing`` (torch_dist)
saves and loads those tensors at any TP/PP/EP/DP layout.

Only the tensors go through dist_checkpointing, one flat request over every
sub-optimizer: the chained optimizer's structure (one sub-optimizer for dense and
one for expert-parallel params, or a single one at ep=1) changes with the layout,
so its non-tensor state (param groups) is this run's own, and the one number that
must carry over, Adam's step count, is saved by the caller.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron_mole.runtime import compat

# Megatron's fully reshardable format; no per-sub-optimizer key prefix (keys are the params' own).
METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _replica_id(t) -> tuple:
    """(PP, TP, DP) replica coordinates: 0 marks the copy that is written."""
    from megatron.core import parallel_state as ps

    tp_split = t.split_dim is not None and t.placement.tp_size > 1
    tp = 0 if tp_split else ps.get_tensor_model_parallel_rank()
    # expert-parallel tensors, and adapters of the base's experts (allreduce=False, FactorLLM's expert
    # LoRA): one copy per expert-data-parallel group
    per_expert = t.experts.size > 1 or getattr(t.param, "allreduce", True) is False
    dp = ps.get_expert_data_parallel_rank() if per_expert else ps.get_data_parallel_rank()
    return (0, tp, dp)


def _description(name: str, t):
    """ShardedTensorFactory over ``t.param``: its blocks of the full tensor ``name``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    experts = (0, t.experts.rank, t.experts.size) if t.experts.size > 1 else None
    split = t.split_dim if t.split_dim is not None and t.placement.tp_size > 1 else None
    stride = t.placement.stride if split is not None and t.placement.kind == "column" else 1
    tp_size, tp_rank = t.placement.tp_size, t.placement.tp_rank
    if split is not None and experts is not None and split == 0:
        raise ValueError(f"adapter tensor {name}: TP split along the expert dim is not supported")

    def build(key, data, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"adapter tensor {name}: flattened optimizer shards are not supported")
        blocks = data.chunk(stride, dim=split) if split is not None else (data,)
        out = []
        for j, block in enumerate(blocks):
            offsets = [experts] if experts else []
            if split is not None:  # rank r holds blocks r, r + tp, ... of tp * stride
                offsets.append((split, tp_rank + j * tp_size, tp_size * stride))
            out.append(ShardedTensor.from_rank_offsets(key, block, *offsets, replica_id=replica_id))
        return out

    def merge(blocks):
        return torch.cat(blocks, dim=split) if split is not None else blocks[0]

    return ShardedTensorFactory(name, t.param, build, merge, replica_id=_replica_id(t))


def adapter_sharded_state_dict(model) -> dict:
    """{global adapter name: sharded description of the local param} for every chunk of ``model``."""
    from megatron_mole.model import adapter_wrappers

    return {w.adapter_name(t): _description(w.adapter_name(t), t)
            for w in adapter_wrappers(model) for t in w.adapter_tensors()}


def factorllm_params(chunks, adapters: bool) -> dict:
    """Sharded descriptions (fresh: saving and loading consume them) of a FactorLLM run's trained
    params that are not adapter tensors (routers, experts: Megatron's own), with ``adapters`` the
    expert adapters' too: the ``extra`` and ``params`` of the functions below."""
    from megatron_mole.layers.factorllm import trained_param_descriptions

    out = trained_param_descriptions(chunks)
    return {**adapter_sharded_state_dict(chunks), **out} if adapters else out


def _dense_description(name: str, param):
    """ShardedTensor over a non-adapter trainable param (a LLaVA projector's or Parrot's): Megatron's
    own TP attributes say its split (none: replicated over TP); replicated over DP."""
    from megatron.core import parallel_state as ps

    split = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    t = SimpleNamespace(param=param, split_dim=split, experts=SimpleNamespace(size=1, rank=0),
                        placement=SimpleNamespace(tp_size=ps.get_tensor_model_parallel_world_size(),
                                                  tp_rank=ps.get_tensor_model_parallel_rank(),
                                                  stride=getattr(param, "partition_stride", 1), kind="column"))
    return _description(name, t)


def trainable_sharded_state_dict(model) -> dict:
    """The adapters' descriptions plus those of a LLaVA model's projector and Parrot params."""
    from megatron_mole.model import multimodal_parameters

    out = adapter_sharded_state_dict(model)
    out.update({name: _dense_description(name, p) for name, p in multimodal_parameters(model).items()})
    return out


def sub_optimizers(optimizer) -> list:
    """The optimizers of a ChainedOptimizer (itself otherwise) that hold params on this rank."""
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if getattr(o, "optimizer", None)]


def adam_step(optimizer) -> int | None:
    """Adam's step count (every param of every sub-optimizer shares it); None before the first step.
    Collective when torch.distributed is initialised: a rank whose shard holds no state learns it
    from the others."""
    import torch.distributed as dist

    steps = [int(state["step"]) for sub in sub_optimizers(optimizer) for state in sub.optimizer.state.values()
             if "step" in state]
    step = torch.tensor([max(steps, default=-1)], dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            step = step.cuda()
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return None if step.item() < 0 else int(step.item())


def _allocate_state(sub):
    """Adam state of a sub-optimizer that never stepped: Megatron's own allocation plus torch's step
    count, which the distributed optimizer's state_dict needs (without apex/TE it reads the step
    from every param's state)."""
    if len(sub.optimizer.state) == 0:
        sub.init_state_fn(sub.optimizer, sub.config)
    for state in sub.optimizer.state.values():
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))


def _fix_group_index_map(sub):
    """Megatron-core 0.16's distributed optimizer maps each model param to (group, order) in the
    order of its grad buffers, while the inner optimizer's groups list the fp32 params first, then
    the fp32 mains of the bf16 ones. With one dtype per group (Megatron's models) the two agree; our
    bf16 adapters share a group with fp32 routers, and the checkpoint helpers then read and write
    another param's state (a size mismatch, or silently the wrong tensor). Rebuild the map in the
    inner optimizer's order; nothing else reads it."""
    fp32_groups, float16_groups = getattr(sub, "model_fp32_groups", None), getattr(sub, "model_float16_groups", None)
    index_map = getattr(sub, "model_param_group_index_map", None)
    if index_map is None or fp32_groups is None or float16_groups is None:
        return
    for group_index, (fp32, float16) in enumerate(zip(fp32_groups, float16_groups)):
        for order, param in enumerate([*fp32, *float16]):
            index_map[param] = (group_index, order)


def _float16_sharded_state_dict(sub, model_sd):
    """``Float16OptimizerWithFloat16Params.sharded_state_dict`` (the non-distributed bf16 optimizer)
    for groups that mix bf16 and fp32 params. Megatron-core 0.16's numbers the torch state by the bf16
    params alone and pairs the fp32 mains with the group's first param ids, so with our fp32 routers
    it fails ('Param id N does not match') or mislabels. Here every id is the param's position in the
    inner optimizer (each bf16 param represented there by its fp32 main); same keys and layout."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    model_of = {id(main): model for mains, models in zip(sub.fp32_from_float16_groups, sub.float16_groups)
                for main, model in zip(mains, models)}
    ordered = [[model_of.get(id(p), p) for p in group["params"]] for group in sub.optimizer.param_groups]
    state_dict = sub.state_dict()
    id_map = get_param_id_to_sharded_param_map(model_sd, (p for group in ordered for p in group))
    state_groups = state_dict["optimizer"]["param_groups"]
    state_dict["fp32_from_fp16_params"] = [
        [make_sharded_optimizer_tensor(id_map[param_id], param, prefix="optimizer.state.fp32_param")
         for param_id, param in zip(state_group["params"], group["params"]) if id(param) in model_of]
        for state_group, group in zip(state_groups, sub.optimizer.param_groups)]
    optim_state_to_sharding_state(state_dict["optimizer"], id_map, exclude_keys="step")
    return state_dict


def _sub_sharded_state_dict(sub, model_sd, is_loading):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if isinstance(sub, Float16OptimizerWithFloat16Params):
        return _float16_sharded_state_dict(sub, model_sd)
    return sub.sharded_state_dict(model_sd, is_loading=is_loading, metadata=METADATA)


def _sharded(optimizer, model, is_loading: bool, extra=None):
    """(per-sub-optimizer state dicts, their ShardedBase leaves in one traversal order). ``extra``:
    descriptions of trainable params that are not adapter tensors (FactorLLM's routers, experts)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    model_sd = {**trainable_sharded_state_dict(model), **(extra or {})}
    for sub in sub_optimizers(optimizer):
        _fix_group_index_map(sub)
    if is_loading:
        for sub in sub_optimizers(optimizer):
            _allocate_state(sub)
    parts = [_sub_sharded_state_dict(sub, model_sd, is_loading) for sub in sub_optimizers(optimizer)]
    leaves = []

    def collect(x):
        if isinstance(x, ShardedBase):
            leaves.append(x)
        return x

    for part in parts:
        dict_list_map_inplace(collect, part)
    return parts, leaves


def save_optimizer_state(optimizer, model, directory, extra=None, params=None) -> None:
    """Collective: every rank writes its part of the optimizer state into ``directory`` (torch_dist);
    ``params`` (descriptions, fresh ones: saving consumes them): these params' values too."""
    from megatron.core import dist_checkpointing

    _, leaves = _sharded(optimizer, model, is_loading=False, extra=extra)
    payload = {i: leaf for i, leaf in enumerate(leaves)}
    if params:
        payload["params"] = params
    compat.prime_checkpoint_writer()
    dist_checkpointing.save(payload, str(directory))


def load_params(params: dict, directory) -> None:
    """Collective: this rank's shard of each described param (``{key: description}``), as
    ``save_optimizer_state(params=...)`` wrote it at any layout, copied into the param."""
    from megatron.core import dist_checkpointing

    targets = {key: description.data for key, description in params.items()}
    loaded = dist_checkpointing.load({"params": params}, str(directory))["params"]
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(loaded[key])


def load_optimizer_state(optimizer, model, directory, step: int | None, extra=None) -> None:
    """Collective: load the Adam moments and fp32 main params of this rank's shard of every adapter
    param (and of the ``extra`` described ones) from ``directory`` (saved at any layout), then set
    Adam's step count to ``step``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    parts, leaves = _sharded(optimizer, model, is_loading=True, extra=extra)
    loaded = dist_checkpointing.load({i: leaf for i, leaf in enumerate(leaves)}, str(directory))
    values = iter(loaded[i] for i in range(len(leaves)))
    for sub, part in zip(sub_optimizers(optimizer), parts):
        # the loaded tensors in place of their descriptions; local objects (param ids) unwrapped, as
        # dist_checkpointing.load does for the dicts it is given
        dict_list_map_inplace(lambda x: next(values) if isinstance(x, ShardedBase) else
                              x.unwrap() if isinstance(x, LocalNonpersistentObject) else x, part)
        if "param_state" in part:  # the distributed optimizer
            # Its load_state_dict would also take the param groups (ours are this run's) and, with
            # torch's Adam, copy every state key into the loaded ones, 'step' included, which the
            # format leaves out (KeyError): load the param state alone, 'step' set aside meanwhile.
            steps = {param: state.pop("step") for param, state in sub.optimizer.state.items()}
            sub.load_parameter_state_from_fully_reshardable(part["param_state"])
            for param, value in steps.items():
                sub.optimizer.state[param]["step"] = value
        else:  # Megatron's (mixed-precision) optimizer: the torch state dict under 'optimizer' or itself
            # the step count is shared by every param as 'common_step' (0 is left out on save)
            inner = part["optimizer"] if "optimizer" in part else part
            inner["state"]["common_step"] = torch.tensor(float(step or 0))
            sub.load_state_dict(part)
    if step is not None:
        for sub in sub_optimizers(optimizer):
            for state in sub.optimizer.state.values():
                state["step"] = torch.full_like(state["step"], float(step))
