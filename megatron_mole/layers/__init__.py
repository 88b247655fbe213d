"""Adapter wrappers around Megatron-core modules, and the registries that name them.

- ``specs``: one registered spec per adapter kind (names, shapes, TP/EP splits,
  init, Hugging Face layout, parameter counts) and the method registry;
- ``linear.LoRALinear`` / ``linear.MoLELinear``: a plain LoRA or a MoLE
  mixture (``expert_scope="linear"``) around one Column/RowParallelLinear
  (or a plain ``nn.Linear``);
- ``mole_mlp.MoLEMLP``: the MLP-scope mixture (``expert_scope="mlp"``);
- ``methods``: the built-in method ``"mole"``;
- ``perft`` / ``perft_e``: the PERFT methods for MoE bases (adapters per MoE block);
- ``factorllm``: the method ``"factorllm"`` (a factorised base's router and its training losses);
- ``parallel``: the TP/SP placement of adapters, derived from the base layer;
- ``context``: the routing context a model supplies to its adapters.

Wrappers only wire routing/, dispatch/ and experts/ together. Importing this
package registers the built-in kinds and methods.
"""
from megatron_mole.layers import factorllm, linear, methods, mole_mlp, perft, perft_e  # noqa: F401  (registrations)
from megatron_mole.layers.specs import ADAPTER_KINDS, METHODS, register_adapter_kind, register_method

__all__ = ["ADAPTER_KINDS", "METHODS", "register_adapter_kind", "register_method"]
