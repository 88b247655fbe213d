"""Exporting what trains on a LLaVA base: the LM's MoLE adapters, the projector, Parrot.

:func:`export_llava_adapter` writes the usual adapter directory (the LM's adapters under
transformers' Llava module names, ``model.language_model.layers.{L}...``) plus
``multimodal.safetensors`` (the projector's full tensors under
``model.multi_modal_projector.*`` and Parrot's under ``parrot.*``) and an
``adapter_config.json`` "multimodal" section; ``megatron_mole.hf.load_mole_adapter`` loads
all of it into a ``LlavaForConditionalGeneration`` (hf/multimodal.py).
:func:`import_llava_adapter` puts the same directory back into Megatron LLaVAModel chunks.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict

import torch

from megatron_mole.checkpoint.adapters import CONFIG_NAME, to_hf_adapter, write_adapter_dir
from megatron_mole.errors import CheckpointError

__all__ = ["export_llava_adapter", "write_llava_adapter", "import_llava_adapter", "load_multimodal_state",
           "projector_to_hf", "projector_to_megatron"]

_PROJ = re.compile(r"^vision_projection\.encoder\.linear_fc(\d)\.(weight|bias)$")
_HF_PROJ = re.compile(r"^model\.multi_modal_projector\.linear_(\d)\.(weight|bias)$")


def projector_to_hf(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in sd.items():
        match = _PROJ.match(name)
        if match is None:
            raise CheckpointError(f"projector tensor {name!r} has no Hugging Face name")
        out[f"model.multi_modal_projector.linear_{match.group(1)}.{match.group(2)}"] = value.contiguous()
    return out


def projector_to_megatron(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        match = _HF_PROJ.match(name)
        if match is not None:
            out[f"encoder.linear_fc{match.group(1)}.{match.group(2)}"] = value
    return out


def export_llava_adapter(model, spec: dict, out_dir: str, projector: bool = True, overwrite: bool = False) -> dict:
    """Collective: every rank calls it; rank 0 writes ``out_dir``. Returns the adapter config."""
    import torch.distributed as dist

    from megatron_mole.model import adapter_state_dict, parrot_state_dict, projector_state_dict

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    cfg = getattr(chunks[0], "mole_config", None)
    if cfg is None:
        raise CheckpointError("export_llava_adapter: the model has no MoLE adapters (apply_mole first)")
    sd = adapter_state_dict(chunks)
    projector_sd = projector_state_dict(chunks) if projector else None
    parrot_sd = parrot_state_dict(chunks)
    parrot = getattr(chunks[0], "parrot_config", None)
    write = not dist.is_initialized() or dist.get_rank() == 0
    config = write_llava_adapter(out_dir, sd, cfg, spec, projector_sd, parrot_sd, parrot, overwrite, write=write)
    if dist.is_initialized():
        dist.barrier()
    return config


def write_llava_adapter(out_dir: str, sd: Dict[str, torch.Tensor], cfg, spec: dict, projector_sd, parrot_sd,
                        parrot_config, overwrite: bool = False, base_ref: dict | None = None,
                        write: bool = True) -> dict:
    """The exported directory from state dicts: the LM's adapters ``sd`` (Megatron names), the
    projector's full tensors ``projector_sd`` (``vision_projection.*``; None: not exported), Parrot's
    ``parrot_sd`` (``parrot.*``) and its ``parrot_config`` (None: no Parrot). Used by
    :func:`export_llava_adapter` (a live model) and ``megatron-mole export`` (a training checkpoint)."""
    from safetensors.torch import save_file

    from megatron_mole.checkpoint.convert import atomic_output_dir
    from megatron_mole.hf.multimodal import MULTIMODAL_NAME

    extra = projector_to_hf(projector_sd) if projector_sd is not None else {}
    extra.update(parrot_sd or {})
    config, tensors = to_hf_adapter(sd, cfg, spec, base_ref)
    config["multimodal"] = {"projector": projector_sd is not None,
                            "parrot": None if parrot_config is None else
                            {k: v for k, v in parrot_config.items() if k != "seed"},
                            "image_token_id": spec["llava"]["image_token_index"]}
    if write:
        with atomic_output_dir(out_dir, overwrite) as tmp:
            write_adapter_dir(tmp, config, tensors)
            save_file(extra, os.path.join(tmp, MULTIMODAL_NAME), metadata={"format": "pt"})
    return config


def import_llava_adapter(chunks, adapter_dir: str) -> None:
    """Load an exported LLaVA adapter (LM adapters, projector, Parrot) into Megatron LLaVAModel chunks."""
    from safetensors.torch import load_file

    from megatron_mole.checkpoint.verify import apply_adapter
    from megatron_mole.hf.multimodal import MULTIMODAL_NAME
    from megatron_mole.layers.parrot import apply_parrot

    with open(os.path.join(adapter_dir, CONFIG_NAME)) as f:
        section = json.load(f).get("multimodal") or {}
    apply_adapter([c.language_model for c in chunks], adapter_dir)
    if not section:
        return
    tensors = load_file(os.path.join(adapter_dir, MULTIMODAL_NAME))
    parrot = section.get("parrot")
    for chunk in chunks if parrot else ():
        apply_parrot(chunk, parrot["num_experts"], parrot["ffn_hidden_size"], parrot["alpha"],
                     parrot.get("lora_rank"), parrot.get("lora_alpha"))
    load_multimodal_state(chunks, {"vision_projection." + k: v for k, v in projector_to_megatron(tensors).items()},
                          {k: v for k, v in tensors.items() if k.startswith("parrot.")})


def load_multimodal_state(chunks, projector_sd: Dict[str, torch.Tensor], parrot_sd: Dict[str, torch.Tensor]) -> None:
    """Full projector tensors (``vision_projection.*``, as ``model.projector_state_dict`` names them;
    each TP rank takes its slice) and Parrot's (``parrot.*``) into the first stage of LLaVAModel chunks."""
    from megatron_mole.layers.parrot import parrot_module

    for chunk in chunks:
        if chunk.vision_projection is None:
            continue
        wrapper = parrot_module(chunk)
        projection = wrapper.base if wrapper is not None else chunk.vision_projection
        _load_projector(projection, {k.removeprefix("vision_projection."): v for k, v in projector_sd.items()})
        if wrapper is not None:
            wrapper.moe.load_state_dict({k[len("parrot."):]: v for k, v in parrot_sd.items()})


def _load_projector(projection, full: Dict[str, torch.Tensor]) -> None:
    from megatron.core import parallel_state as ps

    if not full:
        return
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in projection.named_parameters():
            value = full[name]
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                value = value.chunk(tp, param.partition_dim)[rank]
            param.copy_(value)
