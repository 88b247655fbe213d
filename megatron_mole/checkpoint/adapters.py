"""Adapters Megatron <-> Hugging Face: save, export, import back, merge.

- :func:`save_adapter` / :func:`load_saved_adapter`: a Megatron adapter state dict
  (``adapter_state_dict(model)``: full tensors, global names) with its MoLEConfig and
  a reference to the converted base, as ``megatron_adapter.safetensors`` + ``.json``.
- :func:`export_adapter`: the directory ``megatron_mole.hf.load_mole_adapter`` reads
  (hf/format.py): each adapted Megatron module becomes a *group* found through the
  base converter's own key maps (the rule of ``{module}.weight`` gives the Hugging
  Face linears and the op), so B's rows are split by the very ops that convert the
  base weights: ``qkv`` (per-query-group interleave -> q, k, v), ``concat``
  ([gate; up] -> gate_proj, up_proj), ``copy``. A and routers are copied unchanged.
- :func:`import_adapter`: the inverse (export -> Megatron state dict), bit-exact.
- :func:`merge_into_base`: one-expert adapters (no routing) are plain LoRA deltas
  (hf/peft.py); merging adds (alpha/r) B A to each base weight and writes a full
  Hugging Face checkpoint with the base converter's writer (``write_shards``).

Everything writes into a temporary directory next to the output and renames it into
place when complete (``atomic_output_dir``); errors name the file or tensor.

Legend: E experts, R rank, I in, O out.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from megatron_mole.checkpoint import keymaps
from megatron_mole.layers import ADAPTER_KINDS
from megatron_mole.checkpoint.hf_io import CheckpointError
from megatron_mole.hf.format import (
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    check_shared,
    hf_linear_modules,
    mole_config,
    read_adapter_dir,
    tensor_links,
)
from megatron_mole.hf.peft import lora_deltas

__all__ = ["save_adapter", "load_saved_adapter", "plan_groups", "megatron_to_hf", "hf_to_megatron",
           "to_hf_adapter", "write_adapter_dir", "export_adapter", "import_adapter", "merge_into_base", "merge_from_mcore", "SAVED_CONFIG",
           "SAVED_WEIGHTS"]

SAVED_FORMAT = "megatron_mole.adapter_state/1"
SAVED_CONFIG = "megatron_adapter.json"
SAVED_WEIGHTS = "megatron_adapter.safetensors"
_SPLIT_OPS = ("copy", "qkv", "concat")


def _cfg_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


# ---------------------------------------------------------------- Megatron-side files
def save_adapter(directory: str, sd: Dict[str, torch.Tensor], cfg, base_ref: dict, overwrite: bool = False):
    """Write a Megatron adapter state dict with its MoLEConfig (or its dict) and base reference
    (``{"checkpoint": converted base directory}``); ``export`` reads it like a training checkpoint."""
    from megatron_mole.checkpoint.convert import atomic_output_dir

    meta = {"format": SAVED_FORMAT, "mole_config": _cfg_dict(cfg), "base": dict(base_ref)}
    with atomic_output_dir(directory, overwrite) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, os.path.join(tmp, SAVED_WEIGHTS))
        with open(os.path.join(tmp, SAVED_CONFIG), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")


def load_saved_adapter(directory: str) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """(state dict, MoLEConfig dict, base reference) written by :func:`save_adapter`."""
    path = os.path.join(directory, SAVED_CONFIG)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the adapter description: {err}") from err
    if meta.get("format") != SAVED_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {SAVED_FORMAT!r}")
    weights = os.path.join(directory, SAVED_WEIGHTS)
    try:
        sd = load_file(weights)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is missing, truncated or not a safetensors file: {err}") from err
    return sd, meta["mole_config"], meta["base"]


# ---------------------------------------------------------------- groups and mapping
def _layouts(cfg) -> List[Tuple[object, Dict[str, frozenset]]]:
    """Per registered adapter kind: the tensor names it puts at each module prefix
    (``""``: the unit's own; a linear name: below that linear), from its spec."""
    from megatron_mole.layers import ADAPTER_KINDS

    out = []
    for kind in ADAPTER_KINDS.values():
        names: Dict[str, set] = {}
        for t in kind.layout(cfg):
            where, name = (t.linear, t.name[len(t.linear) + 1:]) if t.per_linear else ("", t.name)
            names.setdefault(where, set()).add(name)
        out.append((kind, {k: frozenset(v) for k, v in names.items()}))
    return out


def _split_name(name: str, suffixes) -> Tuple[str, str]:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    raise CheckpointError(f"adapter tensor {name!r} has no known suffix ({', '.join(sorted(suffixes))})")


def _weight_rules(spec: dict) -> Dict[str, keymaps.RuleInstance]:
    """Megatron parameter name -> its rule instance, for every layer of the base."""
    from megatron_mole.checkpoint.convert import rule_instances

    if spec.get("architecture") == "llava":
        from megatron_mole.checkpoint.llava import adapter_rule_instances

        return {name: inst for inst in adapter_rule_instances(spec) for name in inst.mcore}
    layout = (spec.get("hf") or {}).get("expert_layout", "per_expert")
    return {name: inst for inst in rule_instances(spec, layout) for name in inst.mcore}


def _hf_modules(inst: keymaps.RuleInstance, prefix: str) -> List[str]:
    if inst.op not in _SPLIT_OPS or len(inst.mcore) != 1:
        raise CheckpointError(f"adapted module {prefix!r}: its weight maps to Hugging Face by op {inst.op!r} "
                              f"({list(inst.hf)}), which adapters do not support")
    return [h[: -len(".weight")] for h in inst.hf]


def _moe_kind(cfg):
    """The adapter kind a PERFT method gives MoE blocks (None for other methods)."""
    from megatron_mole.layers import METHODS

    method = METHODS.get(mole_config(cfg).method)
    return None if method is None or method.moe_kind is None else ADAPTER_KINDS[method.moe_kind]


def plan_groups(sd: Dict[str, torch.Tensor], spec: dict, cfg) -> List[dict]:
    """One group (hf/format.py) per adapted Megatron module of ``sd``, via the base's key maps
    and the adapter kinds' specs (``cfg``: the adapter's MoLEConfig or its dict)."""
    layouts = _layouts(mole_config(cfg))
    rules = _weight_rules(spec)
    suffixes = {n for _, names in layouts for group in names.values() for n in group}
    by_prefix: Dict[str, set] = {}
    for name in sd:
        prefix, suffix = _split_name(name, suffixes)
        by_prefix.setdefault(prefix, set()).add(suffix)
    groups, in_unit = [], set()
    moe_kind = _moe_kind(cfg)
    for prefix in sorted(by_prefix):
        found = by_prefix[prefix]
        if f"{prefix}.weight" in rules:
            continue  # a linear: handled below, unless it belongs to an MLP unit
        router = rules.get(f"{prefix}.router.weight")
        if moe_kind is not None and router is not None:  # a PERFT unit: the whole MoE block
            if found != {t.name for t in moe_kind.layout(mole_config(cfg))}:
                raise CheckpointError(f"adapter tensors {sorted(found)} at the MoE block {prefix!r} are not "
                                      f"those of {moe_kind.name!r}")
            gate = _hf_modules(router, f"{prefix}.router")[0]
            groups.append({"kind": moe_kind.name, "megatron": prefix, "hf": gate.rpartition(".")[0]})
            continue
        units = [(kind, names) for kind, names in layouts if kind.unit == "mlp" and names.get("") == found]
        fc = {lin: rules.get(f"{prefix}.{lin}.weight") for lin in ("linear_fc1", "linear_fc2")}
        if not units or None in fc.values():
            raise CheckpointError(f"adapter tensors {sorted(prefix + '.' + s for s in found)} belong to no "
                                  f"linear or MLP of the {spec['architecture']} base")
        kind, names = units[0]
        linears = {lin: _hf_modules(inst, f"{prefix}.{lin}") for lin, inst in fc.items()}
        parent = os.path.commonpath([m.replace(".", "/") for ms in linears.values() for m in ms]).replace("/", ".")
        adapted = [lin for lin in ("linear_fc1", "linear_fc2")
                   if by_prefix.get(f"{prefix}.{lin}") == names.get(lin)]
        in_unit.update(f"{prefix}.{lin}" for lin in adapted)
        groups.append({"kind": kind.name, "megatron": prefix, "hf": parent, "adapted": adapted,
                       "linears": {lin: [m[len(parent) + 1:] for m in ms] for lin, ms in linears.items()}})
    for prefix in sorted(by_prefix):
        if prefix in in_unit or f"{prefix}.weight" not in rules:
            continue
        kinds = [kind for kind, names in layouts if kind.unit == "linear" and names.get("") == by_prefix[prefix]]
        if not kinds:
            raise CheckpointError(f"adapter tensors {sorted(by_prefix[prefix])} at {prefix!r} match no adapter "
                                  f"kind's tensors")
        inst = rules[f"{prefix}.weight"]
        groups.append({"kind": kinds[0].name, "megatron": prefix, "hf": _hf_modules(inst, prefix), "op": inst.op})
    expected = {m for g in groups for m, _, _ in tensor_links(g, cfg)}
    if expected != set(sd):
        raise CheckpointError(f"adapter tensors missing {sorted(expected - set(sd))[:4]} or unexpected "
                              f"{sorted(set(sd) - expected)[:4]} for their modules")
    return groups


def _split_rows(op: str, b__OR: torch.Tensor, shapes: dict) -> List[torch.Tensor]:
    # The key-map ops act on dim 0 (a weight's out dim); B's out dim is -2 ([O, R] or [E, O, R]).
    parts = keymaps.OPS[op][1]([b__OR.movedim(-2, 0)], shapes)
    return [p.movedim(0, -2).contiguous() for p in parts]


def _join_rows(op: str, parts: List[torch.Tensor], shapes: dict) -> torch.Tensor:
    (fused,) = keymaps.OPS[op][0]([p.movedim(-2, 0) for p in parts], shapes)
    return fused.movedim(0, -2).contiguous()


def megatron_to_hf(sd: Dict[str, torch.Tensor], groups: List[dict], shapes: dict, cfg) -> Dict[str, torch.Tensor]:
    out = {}
    for group in groups:
        for megatron_name, hf_names, how in tensor_links(group, cfg):
            value = sd[megatron_name]
            # shared tensors get a copy per name: safetensors refuses shared storage
            parts = [value.clone() for _ in hf_names] if how == "shared" else _split_rows(how, value, shapes)
            for name, part in zip(hf_names, parts):
                out[name] = part.detach().cpu().contiguous()
    return out


def hf_to_megatron(tensors: Dict[str, torch.Tensor], groups: List[dict], shapes: dict, cfg) -> Dict[str, torch.Tensor]:
    out = {}
    for group in groups:
        for megatron_name, hf_names, how in tensor_links(group, cfg):
            if how == "shared":
                out[megatron_name] = check_shared(hf_names, tensors).clone()
            else:
                out[megatron_name] = _join_rows(how, [tensors[n] for n in hf_names], shapes)
    return out


# ---------------------------------------------------------------- export / import
def _layer_ids(groups) -> List[int]:
    return sorted({int(m.group(1)) for g in groups for m in [re.search(r"layers\.(\d+)\.", g["megatron"] + ".")]
                   if m})


def adapter_config(cfg: dict, spec: dict, groups: List[dict], base_ref: dict) -> dict:
    shapes = spec["shapes"]
    return {
        "format": FORMAT,
        "method": cfg["method"],
        "router": cfg["router"],
        "router_args": cfg.get("router_args", {}),
        "num_experts": cfg["num_experts"],
        "top_k": cfg["top_k"],
        "rank": cfg["rank"],
        "alpha": cfg["alpha"],
        "dropout": cfg.get("dropout", 0.0),
        "expert_scope": cfg["expert_scope"],
        "target_modules": sorted(m for g in groups for m in hf_linear_modules(g)),
        "layers": _layer_ids(groups),
        "base": {"model_type": spec["architecture"],
                 "architectures": (spec.get("hf") or {}).get("architectures", []),
                 "num_hidden_layers": spec["transformer"]["num_layers"],
                 "hidden_size": spec["transformer"]["hidden_size"],
                 "checkpoint": base_ref.get("checkpoint")},
        "shapes": {k: shapes[k] for k in ("num_query_groups", "num_attention_heads", "kv_channels")},
        "modules": groups,
        "mole_config": cfg,
    }


def to_hf_adapter(sd: Dict[str, torch.Tensor], cfg, spec: dict, base_ref: Optional[dict] = None):
    """(adapter config, tensors under Hugging Face names) of a Megatron adapter state dict."""
    cfg = _cfg_dict(cfg)
    groups = plan_groups(sd, spec, cfg)
    return adapter_config(cfg, spec, groups, base_ref or {}), megatron_to_hf(sd, groups, spec["shapes"], cfg)


def write_adapter_dir(directory: str, config: dict, tensors: Dict[str, torch.Tensor]) -> None:
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def export_adapter(sd: Dict[str, torch.Tensor], cfg, spec: dict, out_dir: str, base_ref: Optional[dict] = None,
                   overwrite: bool = False) -> dict:
    """Write the Hugging Face adapter directory of a Megatron adapter state dict; returns its config."""
    from megatron_mole.checkpoint.convert import atomic_output_dir

    config, tensors = to_hf_adapter(sd, cfg, spec, base_ref)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_adapter_dir(tmp, config, tensors)
    return config


def import_adapter(adapter_dir: str):
    """(Megatron adapter state dict, MoLEConfig, adapter config) of an exported directory."""
    config, tensors = read_adapter_dir(adapter_dir)
    sd = hf_to_megatron(tensors, config["modules"], config["shapes"], config["mole_config"])
    return sd, mole_config(config["mole_config"]), config


# ---------------------------------------------------------------- one expert: merge
def merge_into_base(config: dict, tensors: Dict[str, torch.Tensor], hf_base: str, out_dir: str,
                    overwrite: bool = False) -> List[str]:
    """Write ``hf_base`` with every adapted weight W replaced by W + (alpha/r) B A (in
    fp32, stored in W's dtype), shard by shard; returns the merged tensor names.
    ``config``/``tensors``: an exported adapter (:func:`to_hf_adapter`, ``read_adapter_dir``)."""
    from megatron_mole.checkpoint.convert import atomic_output_dir
    from megatron_mole.checkpoint.hf_io import HFCheckpoint, copy_side_files, write_shards

    deltas = {f"{m}.weight": ab for m, ab in lora_deltas(config, tensors).items()}
    scaling = float(config["alpha"]) / config["rank"]
    ckpt = HFCheckpoint(hf_base)
    missing = sorted(set(deltas) - set(ckpt.keys()))
    if missing:
        raise CheckpointError(f"{hf_base} lacks the adapted weight(s) {missing[:4]}: not the adapter's base")

    def produce(keys):
        out = {}
        for key in keys:
            weight = ckpt.get(key)
            if key in deltas:
                a, b = deltas[key]
                if list(weight.shape) != [b.shape[0], a.shape[1]]:
                    raise CheckpointError(f"{key} in {ckpt.file_of(key)} has shape {list(weight.shape)}; the "
                                          f"adapter's B A is {[b.shape[0], a.shape[1]]}")
                weight = (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)
            out[key] = weight
        return out

    files: Dict[str, List[str]] = {}
    for key in ckpt.keys():
        files.setdefault(ckpt.file_of(key), []).append(key)
    indexed = os.path.exists(os.path.join(hf_base, "model.safetensors.index.json"))
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_shards(tmp, files, produce, ckpt.file_metadata, ckpt.index_metadata, indexed)
        copy_side_files(hf_base, tmp)
    return sorted(deltas)


def merge_from_mcore(config: dict, tensors: Dict[str, torch.Tensor], mcore_dir: str, out_dir: str,
                     overwrite: bool = False) -> List[str]:
    """:func:`merge_into_base` for a base known only as a converted Megatron directory: the base
    is first written back to Hugging Face form (``mcore_to_hf``) in a temporary directory."""
    from megatron_mole.checkpoint.convert import mcore_to_hf

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.base-", dir=parent)
    try:
        mcore_to_hf(mcore_dir, os.path.join(scratch, "hf"))
        return merge_into_base(config, tensors, os.path.join(scratch, "hf"), out_dir, overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
