"""Converters Hugging Face <-> Megatron-core distributed checkpoints, exact in both directions.

``hf_to_mcore`` builds Megatron's GPTModel at TP1/PP1/EP1 on the meta device: a template
that names every tensor, its global shape and how torch_dist stores it, with no memory
behind it. Every Hugging Face tensor's shape and dtype is validated from the safetensors
headers before any data is read. The rule instances (a layer's q/k/v, an expert's gate/up)
are then split into contiguous runs of about equal bytes, one per process (one process
without torchrun: all of them); each process reads only the byte ranges of its own HF
tensors, builds its Megatron tensors, and passes just those to
``dist_checkpointing.save`` marked as their main replica (``replica_id`` 0), so each is
written exactly once and the saved checkpoint - global tensors, their chunks - is the
same whatever the number of processes. Memory per process: its share plus about one layer.
``load_model`` reshards the result to any TP/PP/EP.

``mcore_to_hf`` writes back exactly what was read: the same keys in the same files, each
tensor in the dtype it had, the original index metadata, and the config/tokenizer files
byte for byte. It streams too: each output file loads just the Megatron tensors it needs,
so memory holds about one output shard in both forms; under torchrun the files are shared
out among the processes (a model in one file is written by one process).

Both write into a temporary directory next to the output and rename it into place only
when complete (rank 0 does that after every rank has written); on any error nothing is
left behind. Errors about the input are found from the headers alone, identically on
every rank, before any collective call.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from typing import Dict, List, Optional

import torch

from megatron_mole.checkpoint import keymaps, llava
from megatron_mole.checkpoint.hf_io import (
    CheckpointError,
    HFCheckpoint,
    INDEX_NAME,
    copy_side_files,
    dtype_from_name,
    dtype_name,
    write_files,
    write_index,
)
from megatron_mole.checkpoint.mcore import (
    DIST_DIR,
    HF_DIR,
    SPEC_NAME,
    build_gpt_model,
    load_tensors,
    read_spec,
    conversion_runtime,
)
from megatron_mole.checkpoint.spec import check_layout, config_value, load_hf_config, spec_from_hf_config
from megatron_mole.runtime import compat

__all__ = ["hf_to_mcore", "mcore_to_hf", "atomic_output_dir", "resolve_dtype"]

FORMAT = "megatron_mole.base/1"


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary directory beside ``out_dir``; rename it into place on success."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            # Move the old output aside first so a failure here never loses both.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _expert_layout(ckpt: HFCheckpoint, mlp_kind: str) -> str:
    if mlp_kind == "dense":
        return "per_expert"
    fused = any(k.endswith("mlp.experts.gate_up_proj") for k in ckpt.keys())
    return "fused" if fused else "per_expert"


def rule_instances(spec, expert_layout):
    """All rule instances in streaming order: embeddings, layer 0..L-1, then the rest."""
    if llava.is_llava_spec(spec):
        return llava.llava_rule_instances(spec)
    flags, experts = spec["flags"], spec["shapes"]["num_experts"]
    rules = keymaps.rules_for(spec["mlp_kind"], expert_layout)
    # moe_layer_freq as a list marks dense layers (0) inside an MoE model.
    pattern = spec["transformer"].get("moe_layer_freq")
    dense_rules = keymaps.rules_for("dense") if isinstance(pattern, list) else rules
    head = keymaps.expand_rules(rules, flags, None, experts)
    first = [i for i in head if i.mcore[0].startswith("embedding.")]
    last = [i for i in head if not i.mcore[0].startswith("embedding.")]
    layers = []
    for layer in range(spec["transformer"]["num_layers"]):
        layer_rules = dense_rules if isinstance(pattern, list) and not pattern[layer] else rules
        layers += keymaps.expand_rules(layer_rules, flags, layer, experts)
    return first + layers + last


def _expected_hf_shapes(instance, params, ctx) -> List[List[int]]:
    metas = [torch.empty(params[name].shape, device="meta") for name in instance.mcore]
    return [list(t.shape) for t in keymaps.apply_to_hf(instance, metas, ctx)]


def _exact_cast(source: torch.dtype, target: torch.dtype) -> bool:
    # Widening float casts are exact (bf16 and fp16 both fit in fp32); bf16 <-> fp16 is not.
    return source == target or torch.finfo(target).bits > torch.finfo(source).bits


def resolve_dtype(ckpt: HFCheckpoint, keys, dtype: Optional[str]) -> torch.dtype:
    """The Megatron params dtype for ``--dtype`` (None: the checkpoint's one dtype).

    Warns, naming a tensor, when the cast rounds; mixed dtypes without ``--dtype``
    are a CheckpointError naming a tensor of each.
    """
    found = {}
    for key in keys:
        found.setdefault(ckpt.dtype(key), key)
    if dtype is not None:
        target = dtype_from_name(dtype)
        lossy = [f"{key!r} ({dtype_name(d)})" for d, key in found.items() if not _exact_cast(d, target)]
        if lossy:
            warnings.warn(f"--dtype {dtype_name(target)} rounds tensors such as {', '.join(lossy)}: "
                          f"converting back will not reproduce them bit for bit")
        return target
    if len(found) > 1:
        listing = ", ".join(f"{k!r} is {dtype_name(d)}" for d, k in found.items())
        raise CheckpointError(f"the checkpoint mixes dtypes ({listing}); pass --dtype to choose one")
    return next(iter(found))


def hf_to_mcore(
    hf_dir: str,
    out_dir: str,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: Optional[str] = None,
    overwrite: bool = False,
    vocab_divisor: int = 128,
) -> Dict:
    """Convert a Hugging Face model directory into a Megatron-core distributed checkpoint.

    tp/pp/ep: the layout the checkpoint is meant for (the vocabulary is padded for ``tp``
    and the sizes are checked); the checkpoint itself loads at any layout these divide.
    dtype: the Megatron parameter dtype (default: the checkpoint's own).
    Under torchrun each process converts and writes its share of the tensors (see the module
    docstring); every process must call this with the same arguments.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(out_dir)} already exists "
                              f"(pass --overwrite to replace it)")
    hf_config = load_hf_config(hf_dir)
    if config_value(hf_config, "model_type") == "llava":
        spec = llava.llava_spec_from_hf_config(hf_config, tp=tp, vocab_divisor=vocab_divisor)
    else:
        spec = spec_from_hf_config(hf_config, tp=tp, vocab_divisor=vocab_divisor)
    check_layout(spec, tp, pp, ep)
    from megatron.core import dist_checkpointing

    with HFCheckpoint(hf_dir) as ckpt:
        layout = _expert_layout(ckpt, spec["mlp_kind"])
        head = "language_model.lm_head.weight" if llava.is_llava_spec(spec) else "lm_head.weight"
        spec["flags"]["tied_head_stored"] = not spec["flags"]["untied"] and head in ckpt.weight_map
        instances = rule_instances(spec, layout)
        unused = llava.unused_hf_keys(spec, ckpt.keys()) if llava.is_llava_spec(spec) else []
        used = [k for inst in instances for k in inst.hf if k in ckpt.weight_map]
        params_dtype = resolve_dtype(ckpt, used, dtype)
        spec["params_dtype"] = dtype_name(params_dtype)
        info = conversion_runtime()
        # A template only (names, global shapes, sharding): no memory behind it.
        with torch.device("meta"):
            model = build_gpt_model(spec, params_dtype)
        params = dict(model.named_parameters())
        _check_hf_tensors(ckpt, instances, params, spec["shapes"], unused)
        hf_dtypes = {key: dtype_name(ckpt.dtype(key)) for inst in instances for key in inst.hf}
        hf_dtypes.update({key: dtype_name(ckpt.dtype(key)) for key in unused})
        units = _units(instances)
        sizes = [sum(ckpt.nbytes(key) for inst in unit for key in inst.hf) for unit in units]
        owners = split_contiguous(sizes, info.world_size)
        mine = [unit for unit, owner in zip(units, owners) if owner == info.rank]
        owned = _convert_units(ckpt, mine, params_dtype, spec["shapes"])
        state = _rank_state(model.sharded_state_dict(), owned, params, info.rank)
        spec["hf"] = {
            "weight_map": ckpt.weight_map,
            "indexed": ckpt.index_metadata is not None or os.path.exists(os.path.join(hf_dir, INDEX_NAME)),
            "index_metadata": ckpt.index_metadata,
            "file_metadata": ckpt.file_metadata,
            "dtypes": hf_dtypes,
            "expert_layout": layout,
            "architectures": list(config_value(hf_config, "architectures") or []),
        }
        spec["format"] = FORMAT
        spec["converted_for"] = {"tp": tp, "pp": pp, "ep": ep}
        with shared_output_dir(out_dir, overwrite, info) as tmp:
            if info.rank == 0:
                os.makedirs(os.path.join(tmp, DIST_DIR))
            _barrier(info)
            compat.prime_checkpoint_writer()
            dist_checkpointing.save(state, os.path.join(tmp, DIST_DIR), sharded_strategy=_writer())
            if info.rank == 0:
                copy_side_files(hf_dir, os.path.join(tmp, HF_DIR))
                if unused:  # tensors the Megatron model has no place for, kept verbatim for export
                    from safetensors.torch import save_file

                    save_file({key: ckpt.get(key).contiguous() for key in unused},
                              os.path.join(tmp, llava.UNUSED_NAME))
                with open(os.path.join(tmp, SPEC_NAME), "w") as f:
                    json.dump(spec, f, indent=2)
                    f.write("\n")
    return spec


# Workers of Megatron's torch_dist writer per process (0.16: forked processes, 0.19: threads),
# each writing and fsyncing one file. Set explicitly: the releases' defaults differ (2 vs 1);
# two overlap one file's fsync with the other's writing (cold cache, 485 MB, one process:
# 2.0 s against 2.2-2.9 s with one worker, tools/bench_convert.py).
WRITER_WORKERS = 2


def _writer():
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=WRITER_WORKERS)


def _units(instances) -> List[list]:
    """Rule instances grouped so that instances writing the same Megatron tensor (a tied head
    stored beside its embedding) land in one group, hence on one rank; streaming order kept."""
    units, unit_of = [], {}
    for inst in instances:
        shared = next((unit_of[name] for name in inst.mcore if name in unit_of), None)
        if shared is None:
            shared = len(units)
            units.append([])
        units[shared].append(inst)
        for name in inst.mcore:
            unit_of[name] = shared
    return units


def split_contiguous(sizes: List[int], parts: int) -> List[int]:
    """Owner (0..parts-1) of each item: contiguous runs of about equal total size, in order."""
    total, owners, running = sum(sizes), [], 0
    for size in sizes:
        # An item belongs to the part its midpoint falls in: balanced and order-preserving.
        middle = running + size / 2
        owners.append(min(parts - 1, int(middle * parts / total)) if total else 0)
        running += size
    return owners


def _convert_units(ckpt: HFCheckpoint, units, params_dtype, shapes) -> Dict[str, torch.Tensor]:
    """Read this rank's Hugging Face tensors (just their byte ranges) and build its Megatron tensors.

    Each byte is copied once: the HF tensors are views of the mapped files; an op that
    makes a new tensor (q/k/v and gate/up fusion, a dtype cast, vocabulary padding) copies
    them straight from the page cache into it; gate and up are not even concatenated
    (:class:`_Concatenated`). Where the op copies nothing (a plain copy, an expert's slice)
    the tensors are read with plain reads instead. The next instance's
    ranges are prefetched while this one is converted, and each one's mapped pages are
    released after it.
    """
    owned, written = {}, {}
    instances = [inst for unit in units for inst in unit]
    for i, inst in enumerate(instances):
        if i + 1 < len(instances):
            ckpt.prefetch(instances[i + 1].hf)
        hf_tensors = [ckpt.view(key).to(params_dtype) for key in inst.hf]
        if inst.op == "concat" and inst.mcore[0] not in owned:
            # gate and up stay two tensors, one copy each: see _Concatenated.
            owned[inst.mcore[0]] = _Concatenated([_owned(ckpt, t) for t in hf_tensors])
            written[inst.mcore[0]] = list(inst.hf)
            del hf_tensors
            ckpt.release(inst.hf)
            continue
        outputs = keymaps.apply_to_mcore(inst, hf_tensors, shapes)
        if all(ckpt.is_view(t) for t in outputs):
            # Nothing copied (a plain copy, an expert's slice): one plain read instead.
            hf_tensors = [ckpt.get(key).to(params_dtype) for key in inst.hf]
            outputs = keymaps.apply_to_mcore(inst, hf_tensors, shapes)
        for name, tensor in zip(inst.mcore, outputs):
            tensor = _owned(ckpt, tensor)
            earlier = owned.get(name)
            if isinstance(earlier, _Concatenated):
                earlier = earlier.joined()
            if earlier is not None and not torch.equal(earlier, tensor):
                raise CheckpointError(f"tensors {written[name]} and {list(inst.hf)} should be tied "
                                      f"(tie_word_embeddings) but differ")
            owned[name] = tensor
            written[name] = list(inst.hf)
        del hf_tensors
        ckpt.release(inst.hf)
    return owned


def _owned(ckpt: HFCheckpoint, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone(memory_format=torch.contiguous_format) if ckpt.is_view(tensor) else tensor.contiguous()


class _Concatenated:
    """A Megatron tensor that is ``torch.cat(parts)`` along dim 0 (a GLU fc1: [gate; up]), kept
    as its parts. Megatron stores a GLU fc1 through a factory that splits it into halves, and
    its writer clones each half (a view) before writing; handing it the parts themselves as
    the halves skips both the concatenation and those clones (36% of a Llama's bytes)."""

    def __init__(self, parts):
        self.parts = parts

    def joined(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=0)

    def as_pieces(self, factory):
        """The factory's pieces with the parts as their data, or None unless each piece is
        exactly one part (checked on a meta tensor: the same offset and shape)."""
        first = self.parts[0]
        shape = (sum(p.shape[0] for p in self.parts),) + tuple(first.shape[1:])
        factory.data = torch.empty(shape, dtype=first.dtype, device="meta")
        built = factory.build()
        pieces = built if isinstance(built, list) else list(built.values())
        starts, start = {}, 0
        for i, part in enumerate(self.parts):
            starts[start] = i
            start += part.numel()
        used = []
        for piece in pieces:
            data = piece.data
            i = starts.get(data.storage_offset()) if data.is_contiguous() else None
            if i is None or tuple(data.shape) != tuple(self.parts[i].shape) or i in used:
                return None
            used.append(i)
        if len(used) != len(self.parts):
            return None
        for piece, i in zip(pieces, used):
            piece.data = self.parts[i]
        return built


def _rank_state(sharded: Dict, owned: Dict[str, torch.Tensor], params, rank: int) -> Dict:
    """This rank's part of the model's sharded state dict: the tensors it converted, each
    marked as its main replica (replica_id 0) so that it is written exactly once, and on
    rank 0 the small non-tensor entries (the linears' empty ``_extra_state``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    state = {}
    for name, item in sharded.items():
        if isinstance(item, (ShardedTensor, ShardedTensorFactory)):
            if name in owned:
                value = owned[name]
                if isinstance(value, _Concatenated):
                    item.replica_id = 0  # before building: the pieces inherit it
                    pieces = value.as_pieces(item) if isinstance(item, ShardedTensorFactory) else None
                    if pieces is not None:
                        state[name] = pieces
                        continue
                    value = value.joined()
                item.data = value
            elif name in params:
                continue  # another rank's
            else:
                raise CheckpointError(f"Megatron tensor {name!r} is not a parameter: the converter has no value for it")
        elif rank != 0:
            continue
        item.replica_id = 0
        state[name] = item
    return state


def _barrier(info):
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def shared_output_dir(out_dir: str, overwrite: bool, info):
    """``atomic_output_dir`` for all ranks: rank 0 makes the temporary directory and renames it
    into place once every rank has written its part."""
    if info.world_size == 1:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    box = [None]
    if info.rank == 0:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            box[0] = tmp
            dist.broadcast_object_list(box, src=0)
            yield tmp
            dist.barrier()
    else:
        dist.broadcast_object_list(box, src=0)
        yield box[0]
        dist.barrier()
    dist.barrier()  # the output is in place when any rank returns


def _check_hf_tensors(ckpt: HFCheckpoint, instances, params, shapes, unused=()):
    """Every needed tensor present with the right shape, no tensor left unused (but ``unused``:
    tensors the model never runs, carried beside the checkpoint)."""
    assigned = set()
    for inst in instances:
        for key, expected in zip(inst.hf, _expected_hf_shapes(inst, params, shapes)):
            if key not in ckpt.weight_map:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {ckpt.directory}")
            found = ckpt.shape(key)
            if found != expected:
                raise CheckpointError(
                    f"tensor {key!r} in {ckpt.file_of(key)} has shape {found}; the config implies {expected}"
                )
            if not ckpt.dtype(key).is_floating_point:
                raise CheckpointError(f"tensor {key!r} in {ckpt.file_of(key)} has non-float dtype {ckpt.dtype(key)}")
        assigned.update(inst.mcore)
    mapped = {h for inst in instances for h in inst.hf} | set(unused)
    unused = [k for k in ckpt.keys() if k not in mapped and not any(p.search(k) for p in keymaps.IGNORED_HF_KEYS)]
    if unused:
        raise CheckpointError(
            f"{len(unused)} tensors of {ckpt.directory} have no place in the Megatron model, e.g. "
            f"{unused[:5]} (in {ckpt.file_of(unused[0])}); the config and the weights disagree"
        )
    missing = sorted(set(params) - assigned)
    if missing:
        raise CheckpointError(f"no Hugging Face tensor maps to Megatron parameters {missing[:5]}")


def mcore_to_hf(mcore_dir: str, out_dir: str, overwrite: bool = False) -> Dict:
    """Write a converted Megatron checkpoint back as the Hugging Face files it came from.

    Under torchrun the output files are shared out among the processes (by size); rank 0
    writes the index and the side files.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(out_dir)} already exists "
                              f"(pass --overwrite to replace it)")
    spec = read_spec(mcore_dir)
    hf = spec.get("hf")
    if spec.get("format") != FORMAT or not hf:
        raise CheckpointError(f"{os.path.join(mcore_dir, SPEC_NAME)}: format {spec.get('format')!r}, "
                              f"expected {FORMAT!r} with its 'hf' section")
    info = conversion_runtime()
    # The model is only a template: its sharded state dict says where each tensor lives;
    # each output file loads just the Megatron tensors it needs (see load_tensors).
    with torch.device("meta"):
        model = build_gpt_model(spec, dtype_from_name(spec["params_dtype"]))
    sharded = model.sharded_state_dict()
    params = dict(model.named_parameters())
    ckpt_dir = os.path.join(mcore_dir, DIST_DIR)
    by_key, nbytes = {}, {}
    for inst in rule_instances(spec, hf["expert_layout"]):
        for key, shape in zip(inst.hf, _expected_hf_shapes(inst, params, spec["shapes"])):
            by_key[key] = inst
            nbytes[key] = math.prod(shape) * dtype_from_name(hf["dtypes"][key]).itemsize

    unused_path = os.path.join(mcore_dir, llava.UNUSED_NAME)
    unused = {}
    if os.path.exists(unused_path):
        from safetensors.torch import load_file

        unused = load_file(unused_path)
        for key, value in unused.items():
            nbytes[key] = value.numel() * value.element_size()

    def produce(keys):
        wanted = set(keys)
        out = {k: unused[k] for k in keys if k in unused}
        keys = [k for k in keys if k not in unused]
        instances = list({id(by_key[k]): by_key[k] for k in keys}.values())
        mcore = load_tensors(sharded, sorted({n for inst in instances for n in inst.mcore}), ckpt_dir)
        for inst in instances:
            values = keymaps.apply_to_hf(inst, [mcore[n] for n in inst.mcore], spec["shapes"])
            for name, value in zip(inst.hf, values):
                if name in wanted:
                    out[name] = value.to(dtype_from_name(hf["dtypes"][name]))
        return out

    files: Dict[str, List[str]] = {}
    for key, name in hf["weight_map"].items():
        if key in by_key or key in unused:  # ignored buffers (rotary inv_freq) are not written back
            files.setdefault(name, []).append(key)
    owners = _share_files({name: sum(nbytes[k] for k in keys) for name, keys in files.items()}, info.world_size)
    mine = {name: keys for name, keys in files.items() if owners[name] == info.rank}
    with shared_output_dir(out_dir, overwrite, info) as tmp:
        weight_map, total = write_files(tmp, mine, produce, hf.get("file_metadata"))
        if info.world_size > 1:
            import torch.distributed as dist

            parts = [None] * info.world_size
            dist.all_gather_object(parts, (weight_map, total))
            weight_map = {k: v for part, _ in parts for k, v in part.items()}
            total = sum(t for _, t in parts)
        if info.rank == 0:
            if hf["indexed"]:
                write_index(tmp, weight_map, total, hf.get("index_metadata"))
            src = os.path.join(mcore_dir, HF_DIR)
            if os.path.isdir(src):
                copy_side_files(src, tmp)
    return spec


def _share_files(sizes: Dict[str, int], ranks: int) -> Dict[str, int]:
    """Owner rank of each output file: largest first to the least loaded rank (deterministic)."""
    load, owners = [0] * ranks, {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += sizes[name]
    return owners
