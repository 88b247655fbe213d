"""The exported adapter directory: file names, the module groups, reading and checks.

An adapter directory (written by ``megatron-mole export``) holds::

    adapter_config.json         method, router, sizes, base model, and ``modules``
    adapter_model.safetensors   adapter tensors under Hugging Face module names,
                                global layer ids, experts stacked on dim 0 by global id

``modules`` lists one *group* per adapted Megatron module, which says how its tensors
sit on the Hugging Face side. Which tensors a group has, and which of them are
output rows, comes from its adapter kind's spec (layers/specs.py, ``group["kind"]``):
output-row tensors (B) are split by the base converter's op, the others (A, routers)
are stored once per Hugging Face linear. The built-in kinds:

- ``{"kind": "lora" | "mole_linear", "megatron": P, "hf": [m, ...], "op": OP}``: one
  Megatron linear (a fused one maps to several HF linears: ``linear_qkv`` ->
  q/k/v_proj with ``op="qkv"``, ``linear_fc1`` -> gate/up_proj with ``op="concat"``).
  Each HF linear ``m`` gets ``{m}.lora.lora_a`` [R, I] / ``{m}.lora.lora_b`` [O_m, R]
  (``lora``) or ``{m}.mole.router.weight`` [E, I], ``{m}.mole.lora_a`` [E, R, I],
  ``{m}.mole.lora_b`` [E, O_m, R] (``mole_linear``). A and the router are the
  Megatron tensors themselves, stored once per HF linear (they are shared: the
  loader checks the copies are equal and ties them); B's rows are split by ``op``.
- ``{"kind": "perft_s" | "perft_d" | "perft_r" | "perft_e", "megatron": P, "hf": B}``: a
  whole MoE block (PERFT, layers/perft.py); B is the transformers sparse-MoE block
  (Mixtral ``block_sparse_moe``, Qwen2-MoE ``mlp``, the parent of the base router's
  ``gate``) and its tensors are ``{B}.perft.*`` with the Megatron shapes.
- ``{"kind": "mole_mlp", "megatron": P, "hf": M, "linears": {"linear_fc1": [gate,
  up], "linear_fc2": [down]}, "adapted": [...]}``: one router per MLP
  (``expert_scope="mlp"``): ``{M}.mole.router.weight`` [E, H] and, for each adapted
  Megatron linear, its HF linears' ``{M}.{name}.mole.lora_a`` / ``.lora_b``.

:func:`tensor_links` turns a group into (Megatron tensor name, HF tensor names, how)
triples, ``how`` being ``"shared"`` (every HF name holds a copy) or a split op; the
exporter, the inverse import and the Hugging Face loader all walk these links.

Legend: E experts, R rank, I in, O out, H hidden.
"""
import json
import os
from typing import Dict, Iterator, List, Tuple

import torch

from megatron_mole.errors import MoleError

FORMAT = "megatron_mole.adapter/1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFormatError(MoleError, ValueError):
    """An adapter directory is missing, damaged or does not fit the model; names the file or tensor."""


def group_kind(group: dict):
    """The registered adapter kind of a module group."""
    from megatron_mole.layers import ADAPTER_KINDS

    kind = ADAPTER_KINDS.get(group["kind"])
    if kind is None:
        raise AdapterFormatError(f"module group {group['megatron']!r}: unknown kind {group['kind']!r} "
                                 f"(known: {sorted(ADAPTER_KINDS)})")
    return kind


def mole_config(cfg):
    """A MoLEConfig from a config or its saved dict (an exported ``mole_config``). A saved
    dict without ``balance`` predates that field: its routers balanced per micro-batch and
    carry no balance state."""
    from megatron_mole.config import MoLEConfig

    if isinstance(cfg, MoLEConfig):
        return cfg
    values = dict(cfg)
    values.setdefault("balance", "micro_batch")
    return MoLEConfig.from_dict(values)


def tensor_links(group: dict, cfg) -> Iterator[Tuple[str, List[str], str]]:
    """(Megatron tensor name, HF tensor names, ``"shared"`` or the op splitting B's rows)."""
    kind, mp = group_kind(group), group["megatron"]
    for t in kind.layout(mole_config(cfg)):
        how = "shared"
        if kind.unit == "moe":  # a whole MoE block: its tensors below the HF block, unchanged
            names = [f"{group['hf']}.{t.name}"]
        elif kind.unit == "linear":
            names = [f"{m}.{t.name}" for m in group["hf"]]
            how = group["op"] if t.out_dim is not None else how
        elif not t.per_linear:  # a unit-level tensor (the MLP's router)
            names = [f"{group['hf']}.{t.name}"]
        elif t.linear in group["adapted"]:
            hf_linears = group["linears"][t.linear]
            names = [f"{group['hf']}.{n}.{t.name[len(t.linear) + 1:]}" for n in hf_linears]
            if t.out_dim is not None:
                how = "concat" if len(hf_linears) == 2 else "copy"
        else:
            continue
        yield f"{mp}.{t.name}", names, how


def hf_linear_modules(group: dict) -> List[str]:
    """The adapted Hugging Face linears of a group (full module names)."""
    if group_kind(group).unit == "moe":
        return [group["hf"]]
    if group["kind"] != "mole_mlp":
        return list(group["hf"])
    return [f"{group['hf']}.{n}" for linear in group["adapted"] for n in group["linears"][linear]]


def check_shared(names: List[str], tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The one tensor stored under several names (A, a router); the copies must agree."""
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].shape != first.shape or not torch.equal(tensors[name], first):
            raise AdapterFormatError(f"tensors {names[0]!r} and {name!r} are one Megatron tensor and must be "
                                     f"equal, but differ")
    return first


def read_adapter_dir(directory: str):
    """(config dict, tensors dict) of an exported adapter directory, checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise AdapterFormatError(f"adapter directory {directory!r} does not exist")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise AdapterFormatError(f"{path} is missing")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as err:
        raise AdapterFormatError(f"{config_path} is not valid JSON: {err}") from err
    if config.get("format") != FORMAT:
        what = "a PEFT adapter: use peft.PeftModel.from_pretrained" if "peft_type" in config else \
            f"format {config.get('format')!r}"
        raise AdapterFormatError(f"{config_path}: {what}; expected format {FORMAT!r}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights_path} is truncated or not a safetensors file: {err}") from err
    expected = {n for g in config["modules"] for _, names, _ in tensor_links(g, config["mole_config"]) for n in names}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise AdapterFormatError(f"{weights_path} lacks tensor(s) {missing[:4]} named by {CONFIG_NAME}")
    if extra:
        raise AdapterFormatError(f"{weights_path} has tensor(s) {extra[:4]} that no module of {CONFIG_NAME} "
                                 f"names")
    return config, tensors
