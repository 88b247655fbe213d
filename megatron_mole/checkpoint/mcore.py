"""Megatron-core side of a converted base: build the GPTModel (or HybridModel, or for a LLaVA
base Megatron's LLaVAModel: :mod:`megatron_mole.checkpoint.llava`), save and load it.

A converted directory holds::

    mcore_config.json   the model spec (TransformerConfig fields, GPTModel arguments,
                        key-map flags) and what export needs to write the HF files back
    dist_ckpt/          megatron.core.dist_checkpointing, torch_dist format
    hf/                 the source's config, tokenizer and generation files, verbatim

The model is Megatron-core's own ``GPTModel`` from ``get_gpt_layer_local_spec`` (MoE:
its SequentialMLP experts; dense and MoE layers mixed: ``get_gpt_decoder_block_spec``),
so the checkpoint loads at any TP/PP/EP (and virtual pipeline): the sharded state dict
of the model built for the current layout tells ``dist_checkpointing`` which slices each
rank needs. ``model="hybrid"`` builds Megatron's ``HybridModel`` of the same base instead
(pattern ``"*-"`` per GPT layer, from the same local layer spec) and loads the very same
files through GPT-keyed sharded state dicts (:mod:`megatron_mole.runtime.hybrid`).

``load_tensors`` reads single parameters' regions of the checkpoint through torch's own
checkpoint reader, without Megatron's loader (which wants whole stacked tensors): that
is how export streams.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_mole.checkpoint.hf_io import CheckpointError, dtype_from_name
from megatron_mole.checkpoint.spec import check_layout

__all__ = ["SPEC_NAME", "DIST_DIR", "HF_DIR", "MODEL_KINDS", "read_spec", "build_model", "build_gpt_model",
           "load_model", "load_model_chunks", "conversion_runtime"]

SPEC_NAME = "mcore_config.json"
DIST_DIR = "dist_ckpt"
HF_DIR = "hf"
_ACTIVATIONS = {"silu": F.silu}
MODEL_KINDS = ("gpt", "hybrid")


def _check_model_kind(model: str) -> None:
    if model not in MODEL_KINDS:
        raise ValueError(f"model must be one of {MODEL_KINDS}; got {model!r}")


def read_spec(mcore_dir: str) -> Dict[str, Any]:
    path = os.path.join(mcore_dir, SPEC_NAME)
    if not os.path.exists(path):
        raise CheckpointError(f"{mcore_dir} is not a converted Megatron checkpoint: {SPEC_NAME} is missing")
    with open(path) as f:
        spec = json.load(f)
    if not os.path.isdir(os.path.join(mcore_dir, DIST_DIR)):
        raise CheckpointError(f"{mcore_dir}: the distributed checkpoint folder {DIST_DIR}/ is missing")
    return spec


def _layout():
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_expert_tensor_parallel_world_size(),
    )


def build_model(
    spec: Dict[str, Any],
    params_dtype: torch.dtype,
    device: Optional[torch.device] = None,
    config_overrides: Optional[Dict[str, Any]] = None,
    vp_stage: Optional[int] = None,
    model: str = "gpt",
    attention: str = "auto",
):
    """Megatron's GPTModel (``model="hybrid"``: HybridModel) for ``spec`` at the current
    parallel layout, weights not initialised.

    ``attention``: the layers' core attention, "local" (Megatron's DotProductAttention,
    which keeps [heads, s, s] probabilities for backward), "sdpa" (torch's fused
    attention, runtime/attention.py) or "auto" (sdpa when the config allows it).

    Parameters are allocated on ``device`` (CPU when None): on CPU through Megatron's
    ``use_cpu_initialization``, on CUDA on the current device as Megatron usually does.
    ``vp_stage``: the virtual pipeline chunk to build when a virtual pipeline is set.
    """
    _check_model_kind(model)
    if spec.get("architecture") == "llava":
        from megatron_mole.checkpoint.llava import build_llava_model

        if model != "gpt":
            raise ValueError(f"a LLaVA base builds Megatron's LLaVAModel; model={model!r} does not apply")
        return build_llava_model(spec, params_dtype, device, config_overrides, vp_stage)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, pp, ep, etp = _layout()
    check_layout(spec, tp, pp, ep)
    fields = dict(spec["transformer"])
    if fields.get("window_size") is not None:
        fields["window_size"] = tuple(fields["window_size"])
    on_cpu = device is None or torch.device(device).type == "cpu"
    moe = bool(fields.get("num_moe_experts"))
    if moe and on_cpu:
        # Megatron's alltoall dispatcher does not run on gloo (DESIGN §4); allgather does.
        fields["moe_token_dispatcher_type"] = "allgather"
    if moe:
        # A dense base at ep > 1 keeps these at 1 (Megatron refuses EP without MoE layers);
        # the expert-parallel group then shards only the LoRA experts.
        fields.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    fields.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        # Megatron requires sequence parallelism for MoE layers with TP > 1.
        sequence_parallel=moe and tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype if pp > 1 else None,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        activation_func=_ACTIVATIONS[spec["activation"]],
        use_cpu_initialization=on_cpu,
        # Weights come from the checkpoint: skip Megatron's (slow, layout-dependent) init.
        perform_initialization=False,
    )
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is not None and vpp > 1:
        fields["virtual_pipeline_model_parallel_size"] = vpp
    fields.update(config_overrides or {})
    config = TransformerConfig(**fields)
    from megatron_mole.runtime.attention import resolve_attention, with_core_attention

    sdpa = resolve_attention(attention, config) == "sdpa"
    if isinstance(fields.get("moe_layer_freq"), list):
        # Dense and MoE layers mixed: Megatron's block spec slices the pattern per stage.
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                                vp_stage=vp_stage)
    else:
        layer_spec = get_gpt_layer_local_spec(
            num_experts=fields.get("num_moe_experts"),
            moe_grouped_gemm=bool(fields.get("moe_grouped_gemm", False)),
            normalization="RMSNorm",
        )
    if spec.get("factorllm"):
        # A factorised dense base (checkpoint/factorize.py): Megatron's MoE layer, FactorLLM's router.
        if model != "gpt":
            raise CheckpointError(f"a FactorLLM checkpoint builds model='gpt' only (got {model!r})")
        from megatron_mole.layers.factorllm import factorllm_layer_spec

        layer_spec = factorllm_layer_spec(layer_spec)
    if sdpa:
        layer_spec = with_core_attention(layer_spec)
    gpt = dict(spec["gpt"])
    stages = dict(pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
                  post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
                  vp_stage=vp_stage)
    if model == "hybrid":
        built = _build_hybrid(config, fields, gpt, stages, vpp, sdpa)
    else:
        built = GPTModel(config, layer_spec, **stages, **gpt)
    restore_tensor_parallel_attributes(built)
    if not on_cpu:
        built.to(device)
    return built


build_gpt_model = build_model  # the original name


def _build_hybrid(config, fields, gpt, stages, vpp, sdpa=False):
    """HybridModel of the same base: one "*-" ("*E" for MoE) pair per GPT layer, the same
    local layer specs, a "|" between pipeline (and virtual pipeline) stages."""
    import dataclasses as dc

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_mole.runtime import compat, hybrid

    reason = compat.hybrid_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"model='hybrid': {reason}")
    if gpt.pop("rope_scaling", False):
        raise CheckpointError("model='hybrid': Megatron's HybridModel has no llama3 rope scaling "
                              "(rope_scaling); load this base as model='gpt'")
    gpt.pop("rope_scaling_factor", None)
    num_layers = fields["num_layers"]
    freq = fields.get("moe_layer_freq")
    if not fields.get("num_moe_experts"):
        moe = [False] * num_layers
    elif isinstance(freq, list):
        moe = [bool(f) for f in freq]
    else:
        moe = [i % int(freq or 1) == 0 for i in range(num_layers)]
    segments = ps.get_pipeline_model_parallel_world_size() * (vpp if vpp and vpp > 1 else 1)
    pattern = hybrid.gpt_pattern(num_layers, moe, segments)
    # The hybrid stack counts attention and MLP layers separately; the MoE layer mask of the
    # GPT config does not apply to it (the pattern says which layers are MoE).
    config = dc.replace(config, num_layers=2 * num_layers, moe_layer_freq=1)
    dense_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    moe_spec = None
    if any(moe):
        moe_spec = get_gpt_layer_local_spec(num_experts=fields["num_moe_experts"], normalization="RMSNorm",
                                            moe_grouped_gemm=bool(fields.get("moe_grouped_gemm", False)))
    if sdpa:
        from megatron_mole.runtime.attention import with_core_attention

        dense_spec = with_core_attention(dense_spec)
        moe_spec = None if moe_spec is None else with_core_attention(moe_spec)
    return compat.build_hybrid_model(config, dense_spec, pattern, moe_layer_spec=moe_spec, **stages, **gpt)


def restore_tensor_parallel_attributes(model) -> int:
    """Give Column/RowParallelLinear weights the tensor-parallel attributes Megatron sets only
    while it initialises them (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``). Built with ``perform_initialization=False`` they would lack them, and
    whatever reads them (grad-norm clipping, the adapters' TP placement, which needs stride 2
    on a gated fc1 whose rank-local rows are [gate_r; up_r]) would be silently wrong.
    Returns how many weights it marked."""
    from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                      set_tensor_model_parallel_attributes)
    from megatron.core.transformer.mlp import MLP

    gated_fc1 = {id(m.linear_fc1) for m in model.modules()
                 if isinstance(m, MLP) and m.config.gated_linear_unit}
    marked = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or weight is None \
                or hasattr(weight, "partition_stride"):
            continue
        column = isinstance(module, ColumnParallelLinear)
        stride = 2 if column and id(module) in gated_fc1 else 1
        set_tensor_model_parallel_attributes(weight, True, 0 if column else 1, stride)
        marked += 1
    return marked


def conversion_runtime():
    """Start (or reuse) the CPU runtime conversion runs in: tp=pp=ep=1, any number of processes.

    Under torchrun every process is one data-parallel rank; conversion splits the tensors
    over them by hand (see ``convert.py``), so no model parallelism is involved.
    """
    from megatron_mole import runtime

    if not runtime.is_initialized():
        return runtime.init_distributed(tp=1, pp=1, ep=1, device="cpu")
    info = runtime.get_runtime()
    if (info.tp, info.pp, info.ep) != (1, 1, 1):
        raise RuntimeError(
            f"conversion runs at tp=pp=ep=1 (processes split the tensors among themselves); this runtime has "
            f"tp={info.tp}, pp={info.pp}, ep={info.ep}"
        )
    return info


def _dist_load(sharded: Dict[str, Any], ckpt_dir: str) -> Dict[str, Any]:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(sharded, ckpt_dir)
    except (Exception, CheckpointException) as err:  # torch's CheckpointException is a BaseException
        raise CheckpointError(f"cannot load the distributed checkpoint {ckpt_dir}: {err}") from err


def _checkpoint_keys(ckpt_dir: str):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return set(FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata)
    except Exception as err:
        raise CheckpointError(f"cannot read the distributed checkpoint {ckpt_dir}: {err}") from err


def _sharded_state_dict(chunk, ckpt_dir: str):
    """The chunk's sharded state dict in the checkpoint's (GPTModel) keys."""
    from megatron_mole.runtime import hybrid

    if hybrid.is_hybrid_stack(getattr(chunk, "decoder", None)):
        return hybrid.gpt_keyed_sharded_state_dict(chunk, _checkpoint_keys(ckpt_dir))
    return chunk.sharded_state_dict()


def _load_into(chunks, ckpt_dir: str):
    """Load model chunks (one, or one per virtual pipeline stage) in one collective call."""
    # Sharded keys carry global layer offsets, so all chunks load together.
    state = _dist_load({f"model{i}": _sharded_state_dict(chunk, ckpt_dir) for i, chunk in enumerate(chunks)},
                       ckpt_dir)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"], strict=True)


class _RegionPlanner:
    """The two calls ``FileSystemReader.read_data`` makes: where each read goes."""

    def __init__(self, targets):
        self.targets = targets  # our per-region fqn -> the region's tensor

    def resolve_tensor(self, read_item):
        target = self.targets[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            target = target.narrow(dim, start, length)
        return target

    def commit_tensor(self, read_item, tensor):
        pass


def _read_regions(reader, metadata, sharded_tensors) -> List[torch.Tensor]:
    """Read each ShardedTensor's own region of its global tensor, nothing more."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    outs, items, targets = [], [], {}
    for i, st in enumerate(sharded_tensors):
        if st.key not in metadata.state_dict_metadata:
            raise CheckpointError(f"tensor {st.key!r} is missing from the distributed checkpoint")
        sizes = (1,) * st.prepend_axis_num + tuple(st.local_shape)
        region = torch.empty(sizes, dtype=st.dtype)
        # Read items address their destination by fqn: give each region its own name.
        fqn = f"{i}:{st.key}"
        targets[fqn] = region
        chunk = ChunkStorageMetadata(offsets=torch.Size(st.global_offset), sizes=torch.Size(sizes))
        for item in create_read_items_for_chunk_list(st.key, metadata.state_dict_metadata[st.key], [chunk]):
            items.append(dataclasses.replace(item, dest_index=dataclasses.replace(item.dest_index, fqn=fqn)))
        outs.append(region.reshape(st.local_shape))
    reader.read_data(LoadPlan(items), _RegionPlanner(targets)).wait()
    return outs


def load_tensors(sharded_state_dict: Dict[str, Any], names, ckpt_dir: str) -> Dict[str, torch.Tensor]:
    """Only ``names`` (model parameter names) of a torch_dist checkpoint, read into new tensors.

    Megatron's loader wants whole global tensors (all layers of a stacked key) on a single
    process; this reads just each parameter's region through torch's own checkpoint
    reader, so export streams a checkpoint one output shard at a time.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from torch.distributed.checkpoint import FileSystemReader

    reader = FileSystemReader(ckpt_dir)
    try:
        metadata = reader.read_metadata()
        reader.set_up_storage_reader(metadata, is_coordinator=True)
        out = {}
        for name in names:
            item = sharded_state_dict[name]
            if isinstance(item, ShardedTensorFactory):
                # e.g. a GLU fc1 stored as its two halves: read them, merge back.
                built = item.build()
                parts = built if isinstance(built, list) else list(built.values())
                loaded = _read_regions(reader, metadata, parts)
                out[name] = item.merge_fn(loaded if isinstance(built, list) else dict(zip(built, loaded)))
            else:
                (out[name],) = _read_regions(reader, metadata, [item])
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"cannot read the distributed checkpoint {ckpt_dir}: {err}") from err
    return out


def load_model_chunks(
    mcore_dir: str,
    params_dtype: Optional[torch.dtype] = None,
    config_overrides: Optional[Dict[str, Any]] = None,
    device: Optional[torch.device] = None,
    model: str = "gpt",
    attention: str = "auto",
) -> List[Any]:
    """The model chunks of this rank: one per virtual pipeline stage (one without VPP).

    ``model``: "gpt" (Megatron's GPTModel) or "hybrid" (its HybridModel, megatron-core
    >= 0.19; same weights, adapters named alike: see :mod:`megatron_mole.runtime.hybrid`).

    Call under :func:`megatron_mole.init_distributed`. ``params_dtype`` builds the model
    in another dtype than the checkpoint's (e.g. ``torch.float32`` to verify a bf16 one);
    loading casts each tensor, exactly when widening. Megatron fixes its bf16/fp16
    handling (softmax casts, pipeline buffers) at construction, hence no cast afterwards.
    ``config_overrides`` replaces TransformerConfig fields (fusions on GPUs,
    recomputation, the MoE dispatcher). ``attention``: "auto" | "local" | "sdpa" (see
    :func:`build_model`).
    """
    from megatron.core import parallel_state as ps

    from megatron_mole import runtime

    _check_model_kind(model)
    spec = read_spec(mcore_dir)
    if device is None:
        device = runtime.get_device()
    dtype = params_dtype or dtype_from_name(spec["params_dtype"])
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None or vpp == 1 else list(range(vpp))
    chunks = [build_model(spec, dtype, device, config_overrides, vp_stage=stage, model=model, attention=attention)
              for stage in stages]
    _load_into(chunks, os.path.join(mcore_dir, DIST_DIR))
    return chunks


def load_model(
    mcore_dir: str,
    params_dtype: Optional[torch.dtype] = None,
    config_overrides: Optional[Dict[str, Any]] = None,
    device: Optional[torch.device] = None,
    model: str = "gpt",
    attention: str = "auto",
):
    """Build the GPTModel (``model="hybrid"``: HybridModel) of a converted checkpoint at the
    current layout and load it.

    Arguments as :func:`load_model_chunks`; with a virtual pipeline use that function
    (this rank then holds several chunks).
    """
    chunks = load_model_chunks(mcore_dir, params_dtype, config_overrides, device, model=model, attention=attention)
    if len(chunks) != 1:
        raise ValueError(f"a virtual pipeline of {len(chunks)} stages is set: use load_model_chunks()")
    return chunks[0]
