"""Transformers-side inference with exported adapters (``megatron-mole export``).

    from transformers import AutoModelForCausalLM
    from megatron_mole.hf import load_mole_adapter
    model = load_mole_adapter(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    model.generate(...)

``format`` describes the adapter directory, ``loader`` injects the training modules
(layers/) into transformers models, ``peft`` writes one-expert adapters in PEFT's LoRA
format; ``factorllm`` runs factorised models (``load_factorllm``). Nothing here imports
Megatron-core.
"""
from megatron_mole.hf.factorllm import FactorLLMMoE, load_factorllm
from megatron_mole.hf.format import AdapterFormatError, read_adapter_dir
from megatron_mole.hf.loader import load_mole_adapter

__all__ = ["AdapterFormatError", "FactorLLMMoE", "load_factorllm", "load_mole_adapter", "read_adapter_dir"]
