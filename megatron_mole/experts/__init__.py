"""LoRA expert weights and the grouped-matmul seam (plain PyTorch).

Every expert matmul in megatron_mole goes through :func:`grouped_linear`; its
backend is chosen by name (``MoLEConfig.grouped_mm_backend``) and new backends
(Triton, Transformer Engine) plug in with :func:`register_grouped_mm_backend`.
"""
from megatron_mole.experts.grouped import (
    GROUPED_MM_BACKENDS,
    grouped_linear,
    register_grouped_mm_backend,
)
from megatron_mole.experts.init import full_init, tensor_seed
from megatron_mole.experts.lora import LoRA, LoRAExperts

__all__ = ["GROUPED_MM_BACKENDS", "grouped_linear", "register_grouped_mm_backend", "full_init",
           "tensor_seed", "LoRA", "LoRAExperts"]
