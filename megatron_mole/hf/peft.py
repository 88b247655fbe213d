"""One-expert adapters as plain LoRA, in PEFT's own format.

An adapter is a plain LoRA when nothing is routed: every module group is a ``lora``
one, or there is one expert (a one-expert router's softmax is exactly 1, so its gate
is 1 and the router can be dropped). Then each Hugging Face linear ``m`` has
y = W x + (alpha/r) B A x, which PEFT's ``LoraConfig(r, lora_alpha)`` computes with
``base_model.model.{m}.lora_A.weight`` = A [R, I] and ``lora_B.weight`` = B [O, R].
Megatron's MLP scope with one expert is LoRA on gate_proj, up_proj (A shared, B
split) and down_proj: h = act(W1 x + s B1 A1 x), y = W2 h + s B2 A2 h.

Legend: R rank, I in, O out.
"""
import os
from typing import Dict, Tuple

import torch

from megatron_mole.hf.format import AdapterFormatError, hf_linear_modules

__all__ = ["peft_eligible", "lora_deltas", "write_peft_adapter", "PEFT_WEIGHTS_NAME"]

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def peft_eligible(config: dict) -> None:
    """Refuse (naming why) an adapter that routes over several experts."""
    blocks = [g["megatron"] for g in config["modules"] if g["kind"].startswith("perft_")]
    if blocks:
        raise AdapterFormatError(f"PERFT adapters ({config['method']}) sit parallel to a whole MoE block "
                                 f"({blocks[:2]}), which PEFT's LoRA (on single linears) cannot express; "
                                 f"use megatron_mole.hf.load_mole_adapter")
    routed = [g["megatron"] for g in config["modules"] if g["kind"] != "lora"]
    if config["num_experts"] != 1 and routed:
        raise AdapterFormatError(f"only adapters with one expert and no router are plain LoRA: this one has "
                                 f"num_experts={config['num_experts']} on {routed[:3]}")


def lora_deltas(config: dict, tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """HF linear name -> (A [R, I], B [O, R]) of a plain-LoRA adapter."""
    peft_eligible(config)
    out = {}
    for group in config["modules"]:
        kind = "lora" if group["kind"] == "lora" else "mole"
        for module in hf_linear_modules(group):
            a, b = tensors[f"{module}.{kind}.lora_a"], tensors[f"{module}.{kind}.lora_b"]
            out[module] = (a, b) if kind == "lora" else (a[0], b[0])  # the one expert
    return out


def write_peft_adapter(directory: str, config: dict, tensors: Dict[str, torch.Tensor],
                       base_model_name_or_path: str = None) -> None:
    """Write ``adapter_config.json`` (a ``peft.LoraConfig``) and the LoRA tensors under PEFT's names."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    deltas = lora_deltas(config, tensors)
    lora = LoraConfig(r=config["rank"], lora_alpha=config["alpha"], lora_dropout=config.get("dropout", 0.0),
                      target_modules=sorted(deltas), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_name_or_path)
    lora.save_pretrained(directory)
    weights = {}
    for module, (a, b) in deltas.items():
        weights[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        weights[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(weights, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
