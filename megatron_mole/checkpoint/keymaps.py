"""Declarative key maps Hugging Face <-> Megatron-core, one list of rules per architecture.

A :class:`Rule` pairs one Megatron-core parameter name template with the Hugging Face
tensor name template(s) it is made of, plus the name of a reversible tensor op. The same
rule is used in both directions: ``to_mcore`` when importing, ``to_hf`` when exporting.

Placeholders: ``{L}`` is the global layer index, ``{E}`` the global expert index. A
placeholder that appears on *both* sides expands into one rule instance per value (per
expert tensors such as Mixtral's ``experts.{E}.w1``); a placeholder that appears on the
Megatron side only means the Hugging Face tensor holds all values stacked along dim 0
(transformers 5.x fused ``experts.gate_up_proj [E, 2F, H]``). Megatron names are those of
``GPTModel.named_parameters()`` at TP1/PP1/EP1 with megatron's local layer specs.

Legend: H hidden, F ffn hidden, V vocabulary (Vp padded), G query groups (KV heads),
Q query heads per group, d head dim, E experts.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch

__all__ = ["Rule", "RuleInstance", "OPS", "expand_rules", "rules_for"]


@dataclasses.dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    op: str = "copy"
    when: str = ""  # name of a boolean in the shape context; the rule applies only if it is true


@dataclasses.dataclass(frozen=True)
class RuleInstance:
    """A rule with its placeholders filled: lists of concrete names on each side."""

    mcore: Tuple[str, ...]
    hf: Tuple[str, ...]
    op: str


# ---------------------------------------------------------------------------------------
# Reversible ops. Each maps a list of HF tensors to a list of Megatron tensors and back.
# `ctx` carries the shapes the op needs (query groups, vocab sizes).
# ---------------------------------------------------------------------------------------


def _copy_to_mcore(hf, ctx):
    return list(hf)


def _qkv_to_mcore(hf, ctx):
    # Megatron's fused QKV is interleaved per query group: [q_0..q_{Q-1}, k, v] per group,
    # so that a TP shard of whole groups holds its own queries, key and value.
    q, k, v = hf
    groups = ctx["num_query_groups"]
    rest = q.shape[1:]
    q_GQd = q.reshape(groups, -1, *rest)
    k_Gd = k.reshape(groups, -1, *rest)
    v_Gd = v.reshape(groups, -1, *rest)
    return [torch.cat([q_GQd, k_Gd, v_Gd], dim=1).reshape(-1, *rest)]


def _qkv_to_hf(mc, ctx):
    (qkv,) = mc
    groups = ctx["num_query_groups"]
    head_dim = ctx["kv_channels"]
    per_group_q = ctx["num_attention_heads"] // groups * head_dim
    rest = qkv.shape[1:]
    qkv_G = qkv.reshape(groups, per_group_q + 2 * head_dim, *rest)
    q, k, v = torch.split(qkv_G, [per_group_q, head_dim, head_dim], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _concat_to_mcore(hf, ctx):
    # gate and up projections fused into Megatron's fc1 as [gate; up] (its GLU chunks in 2).
    return [torch.cat(list(hf), dim=0)]


def _concat_to_hf(mc, ctx):
    (fused,) = mc
    return list(torch.chunk(fused, 2, dim=0))


def _stack_to_mcore(hf, ctx):
    (stacked,) = hf
    return list(stacked.unbind(0))


def _stack_to_hf(mc, ctx):
    return [torch.stack(list(mc), dim=0)]


def _vocab_to_mcore(hf, ctx):
    # Padding rows are zero: their logits are 0 and their embeddings are never looked up
    # (token ids stay below the true vocabulary size). Export strips them.
    (table_VH,) = hf
    padded = ctx["padded_vocab_size"]
    if padded == table_VH.shape[0]:
        return [table_VH]
    pad = table_VH.new_zeros((padded - table_VH.shape[0],) + tuple(table_VH.shape[1:]))
    return [torch.cat([table_VH, pad], dim=0)]


def _vocab_to_hf(mc, ctx):
    (table_VpH,) = mc
    return [table_VpH[: ctx["hf_vocab_size"]]]


def _vision_ctx(ctx):
    # A CLIP tower is multi-head (one query per group); its sizes sit beside the LM's.
    heads = ctx["vision_heads"]
    return {"num_query_groups": heads, "num_attention_heads": heads, "kv_channels": ctx["vision_head_dim"]}


def _class_token_to_mcore(hf, ctx):
    (token_D,) = hf  # HF's class_embedding [D]; Megatron's class_token [1, 1, D]
    return [token_D.reshape(1, 1, -1)]


def _class_token_to_hf(mc, ctx):
    (token_11D,) = mc
    return [token_11D.reshape(-1)]


OPS: Dict[str, Tuple[Callable, Callable]] = {
    "vision_qkv": (lambda hf, ctx: _qkv_to_mcore(hf, _vision_ctx(ctx)), lambda mc, ctx: _qkv_to_hf(mc, _vision_ctx(ctx))),
    "class_token": (_class_token_to_mcore, _class_token_to_hf),
    "copy": (_copy_to_mcore, _copy_to_mcore),
    "qkv": (_qkv_to_mcore, _qkv_to_hf),
    "concat": (_concat_to_mcore, _concat_to_hf),
    "stack": (_stack_to_mcore, _stack_to_hf),
    "vocab": (_vocab_to_mcore, _vocab_to_hf),
}

# ---------------------------------------------------------------------------------------
# The maps.
# ---------------------------------------------------------------------------------------

_DL = "decoder.layers.{L}."
_HL = "model.layers.{L}."

GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
    # Some checkpoints store the tied head anyway: it must equal the embedding (checked on
    # import) and is written back from it.
    Rule("embedding.word_embeddings.weight", ("lm_head.weight",), "vocab", when="tied_head_stored"),
)

ATTENTION_RULES = (
    Rule(_DL + "input_layernorm.weight", (_HL + "input_layernorm.weight",)),
    Rule(
        _DL + "self_attention.linear_qkv.weight",
        tuple(_HL + f"self_attn.{p}_proj.weight" for p in "qkv"),
        "qkv",
    ),
    Rule(
        _DL + "self_attention.linear_qkv.bias",
        tuple(_HL + f"self_attn.{p}_proj.bias" for p in "qkv"),
        "qkv",
        when="qkv_bias",
    ),
    Rule(_DL + "self_attention.linear_proj.weight", (_HL + "self_attn.o_proj.weight",)),
    Rule(_DL + "self_attention.linear_proj.bias", (_HL + "self_attn.o_proj.bias",), when="linear_bias"),
    Rule(_DL + "pre_mlp_layernorm.weight", (_HL + "post_attention_layernorm.weight",)),
)


def _gated_mlp(mcore_prefix, hf_prefix, gate="gate_proj", up="up_proj", down="down_proj"):
    return tuple(
        rule
        for kind, when in (("weight", ""), ("bias", "linear_bias"))
        for rule in (
            Rule(mcore_prefix + f"linear_fc1.{kind}", (hf_prefix + f"{gate}.{kind}", hf_prefix + f"{up}.{kind}"),
                 "concat", when=when),
            Rule(mcore_prefix + f"linear_fc2.{kind}", (hf_prefix + f"{down}.{kind}",), when=when),
        )
    )


_EXPERT = _DL + "mlp.experts.local_experts.{E}."

DENSE_MLP_RULES = _gated_mlp(_DL + "mlp.", _HL + "mlp.")

# Mixtral as `save_pretrained` writes it (transformers 5.x reverts its fused in-memory
# experts to the original per-expert names on save).
MIXTRAL_MOE_RULES = (
    Rule(_DL + "mlp.router.weight", (_HL + "block_sparse_moe.gate.weight",)),
) + _gated_mlp(_EXPERT, _HL + "block_sparse_moe.experts.{E}.", "w1", "w3", "w2")

QWEN2_MOE_RULES = (
    Rule(_DL + "mlp.router.weight", (_HL + "mlp.gate.weight",)),
) + _gated_mlp(_EXPERT, _HL + "mlp.experts.{E}.")

# A FactorLLM factorisation of a dense base (checkpoint/factorize.py; hf/factorllm.py reads it):
# Qwen2-MoE-style names plus the router's bias.
FACTORLLM_RULES = (
    Rule(_DL + "mlp.router.weight", (_HL + "mlp.gate.weight",)),
    Rule(_DL + "mlp.router.bias", (_HL + "mlp.gate.bias",)),
) + _gated_mlp(_EXPERT, _HL + "mlp.experts.{E}.")

SHARED_EXPERT_RULES = _gated_mlp(_DL + "mlp.shared_experts.", _HL + "mlp.shared_expert.") + (
    Rule(_DL + "mlp.shared_experts.gate_weight", (_HL + "mlp.shared_expert_gate.weight",), when="shared_expert_gate"),
)

# transformers 5.x in-memory layout, in case a checkpoint was written that way:
# experts stacked in one tensor per layer, gate and up already fused as [gate; up].
FUSED_EXPERT_RULES = (
    Rule(_DL + "mlp.router.weight", (_HL + "mlp.gate.weight",)),
    Rule(_EXPERT + "linear_fc1.weight", (_HL + "mlp.experts.gate_up_proj",), "stack"),
    Rule(_EXPERT + "linear_fc2.weight", (_HL + "mlp.experts.down_proj",), "stack"),
)

# Hugging Face keys that hold no weights (old checkpoints saved rotary buffers).
IGNORED_HF_KEYS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def rules_for(mlp_kind: str, expert_layout: str = "per_expert") -> Tuple[Rule, ...]:
    """All rules of one model: global, attention and MLP.

    mlp_kind: "dense", "mixtral", "qwen2_moe" or "factorllm"; expert_layout: "per_expert" (what
    `save_pretrained` writes) or "fused" (stacked expert tensors).
    """
    if mlp_kind == "dense":
        mlp = DENSE_MLP_RULES
    elif mlp_kind == "factorllm":
        mlp = FACTORLLM_RULES
    elif expert_layout == "fused":
        mlp = FUSED_EXPERT_RULES
    elif mlp_kind == "mixtral":
        mlp = MIXTRAL_MOE_RULES
    elif mlp_kind == "qwen2_moe":
        mlp = QWEN2_MOE_RULES
    else:
        raise ValueError(f"mlp_kind must be dense, mixtral, qwen2_moe or factorllm; got {mlp_kind!r}")
    if mlp_kind == "qwen2_moe":
        mlp = mlp + SHARED_EXPERT_RULES
    return GLOBAL_RULES + ATTENTION_RULES + mlp


def _fill(templates: Sequence[str], **values) -> List[str]:
    return [t.format(**values) for t in templates]


def expand_rules(rules: Sequence[Rule], flags: Dict[str, bool], layer: int = None, num_experts: int = 0):
    """Rule instances of one layer (``layer`` given) or of the non-layer tensors (None)."""
    out = []
    for rule in rules:
        if rule.when and not flags.get(rule.when, False):
            continue
        is_layer = "{L}" in rule.mcore
        if is_layer != (layer is not None):
            continue
        values = {"L": layer} if is_layer else {}
        if "{E}" not in rule.mcore:
            out.append(RuleInstance(tuple(_fill([rule.mcore], **values)), tuple(_fill(rule.hf, **values)), rule.op))
        elif all("{E}" in h for h in rule.hf):
            for expert in range(num_experts):
                out.append(
                    RuleInstance(
                        tuple(_fill([rule.mcore], E=expert, **values)),
                        tuple(_fill(rule.hf, E=expert, **values)),
                        rule.op,
                    )
                )
        else:
            mcore = tuple(rule.mcore.format(E=e, **values) for e in range(num_experts))
            out.append(RuleInstance(mcore, tuple(_fill(rule.hf, **values)), rule.op))
    return out


def apply_to_mcore(instance: RuleInstance, hf_tensors, ctx) -> List[torch.Tensor]:
    return OPS[instance.op][0](hf_tensors, ctx)


def apply_to_hf(instance: RuleInstance, mcore_tensors, ctx) -> List[torch.Tensor]:
    return OPS[instance.op][1](mcore_tensors, ctx)
