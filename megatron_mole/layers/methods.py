"""The built-in method ``"mole"``: which adapter kind adapts a matched linear.

- ``expert_scope="mlp"`` (LLaVA-MoLE / MixLoRA): a matched ``linear_fc1`` /
  ``linear_fc2`` of a dense MLP makes the MLP one ``mole_mlp`` unit; other
  linears (attention) get a plain ``lora``.
- ``expert_scope="linear"`` (MoLA / DynMoLE): every matched linear is a
  ``mole_linear`` unit with its own router.

Linears inside routed MoE experts are left to the PERFT methods and ``"ceft"`` (below).
"""
from megatron_mole.layers.mole_mlp import MLP_LINEARS
from megatron_mole.layers.specs import Method, register_method


@register_method
class MoLEMethod(Method):
    name = "mole"

    def kind_for(self, cfg, linear: str, in_dense_mlp: bool) -> str:
        if cfg.expert_scope == "linear":
            return "mole_linear"
        return "mole_mlp" if linear in MLP_LINEARS and in_dense_mlp else "lora"


@register_method
class CEFTMethod(Method):
    """CEFT (Router Lens): a plain LoRA on every matched linear, including linears inside
    routed MoE experts (``decoder.layers.L.mlp.experts.local_experts.E.linear_fc1``, E the
    global expert id). ``train`` with ``trainable_experts`` targets the selected experts' fc1
    and fc2 this way; the routers and every other expert stay frozen."""
    name = "ceft"
    adapts_moe_experts = True

    def kind_for(self, cfg, linear: str, in_dense_mlp: bool) -> str:
        return "lora"
