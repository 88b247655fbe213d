"""megatron_mole: sparse Mixtures of LoRA Experts (MoLE) for Megatron-core.

Public surface (see README):

    import megatron_mole as mm
    mm.init_distributed(tp=1, pp=1, ep=1, device="auto")
    cfg = mm.MoLEConfig(num_experts=4, rank=8, alpha=16, top_k=1, router="topk")
    model = mm.apply_mole(gpt_model, cfg)
    sd = mm.adapter_state_dict(model)
    mm.load_adapter_state_dict(model, sd)

Names are resolved lazily so that the plain-PyTorch parts (routing, experts, hf)
import without pulling in Megatron-core.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "init_distributed": "megatron_mole.runtime",
    "MoLEConfig": "megatron_mole.config",
    "apply_mole": "megatron_mole.model",
    "adapter_state_dict": "megatron_mole.model",
    "load_adapter_state_dict": "megatron_mole.model",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_mole' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
