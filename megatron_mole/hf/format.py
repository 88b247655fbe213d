"""The exported adapter directory: file names, the module groups, reading and checks.

An adapter directory (written by ``megatron-mole export``) holds::

    adapter_config.json         method, router, sizes, base model, and ``modules``
    adapter_model.safetensors   adapter tensors under Hugging Face module names,
                                global layer ids, experts stacked on dim 0 by global id

``modules`` lists one *group* per adapted Megatron module, which says how its tensors
sit on the Hugging Face side:

- ``{"kind": "lora" | "mole_linear", "megatron": P, "hf": [m, ...], "op": OP}``: one
  Megatron linear (a fused one maps to several HF linears: ``linear_qkv`` ->
  q/k/v_proj with ``op="qkv"``, ``linear_fc1`` -> gate/up_proj with ``op="concat"``).
  Each HF linear ``m`` gets ``{m}.lora.lora_a`` [R, I] / ``{m}.lora.lora_b`` [O_m, R]
  (``lora``) or ``{m}.mole.router.weight`` [E, I], ``{m}.mole.lora_a`` [E, R, I],
  ``{m}.mole.lora_b`` [E, O_m, R] (``mole_linear``). A and the router are the
  Megatron tensors themselves, stored once per HF linear (they are shared: the
  loader checks the copies are equal and ties them); B's rows are split by ``op``.
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

FORMAT = "megatron_mole.adapter/1"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KINDS = ("lora", "mole_linear", "mole_mlp")


class AdapterFormatError(ValueError):
    """An adapter directory is missing, damaged or does not fit the model; names the file or tensor."""


def _prefix(kind: str) -> str:
    return "lora" if kind == "lora" else "mole"


def tensor_links(group: dict) -> Iterator[Tuple[str, List[str], str]]:
    """(Megatron tensor name, HF tensor names, ``"shared"`` or the op splitting B's rows)."""
    kind, mp = group["kind"], group["megatron"]
    if kind not in KINDS:
        raise AdapterFormatError(f"module group {mp!r}: unknown kind {kind!r} (known: {KINDS})")
    if kind in ("lora", "mole_linear"):
        p = _prefix(kind)
        if kind == "mole_linear":
            yield f"{mp}.mole.router.weight", [f"{m}.mole.router.weight" for m in group["hf"]], "shared"
        yield f"{mp}.{p}.lora_a", [f"{m}.{p}.lora_a" for m in group["hf"]], "shared"
        yield f"{mp}.{p}.lora_b", [f"{m}.{p}.lora_b" for m in group["hf"]], group["op"]
        return
    hf = group["hf"]
    yield f"{mp}.mole.router.weight", [f"{hf}.mole.router.weight"], "shared"
    for linear in group["adapted"]:
        names = group["linears"][linear]
        op = "concat" if len(names) == 2 else "copy"
        yield f"{mp}.{linear}.mole.lora_a", [f"{hf}.{n}.mole.lora_a" for n in names], "shared"
        yield f"{mp}.{linear}.mole.lora_b", [f"{hf}.{n}.mole.lora_b" for n in names], op


def hf_linear_modules(group: dict) -> List[str]:
    """The adapted Hugging Face linears of a group (full module names)."""
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
    expected = {n for g in config["modules"] for _, names, _ in tensor_links(g) for n in names}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise AdapterFormatError(f"{weights_path} lacks tensor(s) {missing[:4]} named by {CONFIG_NAME}")
    if extra:
        raise AdapterFormatError(f"{weights_path} has tensor(s) {extra[:4]} that no module of {CONFIG_NAME} "
                                 f"names")
    return config, tensors
