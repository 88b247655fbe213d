"""Megatron-core's HybridModel as a base equivalent to a GPTModel: patterns, names, checkpoints.

A GPTModel of L transformer layers is the HybridModel of pattern ``"*-" * L`` (``"*E"``
for an MoE layer): each GPT layer becomes an attention layer (input norm + self-attention)
followed by an MLP layer (pre-MLP norm + MLP), with the same modules and the same math.
Everything megatron_mole names uses the GPT numbering, so adapters, target patterns and
layer selections are interchangeable between the two bases:

* **Canonical names**: hybrid layer ``h`` (global, 0-based) is GPT layer ``h // 2``; its
  submodule keeps its name (``self_attention.*`` in the even layer, ``mlp.*`` in the odd
  one). ``decoder.layers.3.mlp.linear_fc1`` of a HybridModel is adapted and named as
  ``decoder.layers.1.mlp.linear_fc1`` of the GPTModel. Only patterns made of such pairs
  have a GPT equivalent (:func:`check_gpt_pattern`); Mamba or other layers are refused.
* **Checkpoints**: a converted base is one torch_dist checkpoint written in the GPTModel's
  keys. :func:`gpt_keyed_sharded_state_dict` gives a HybridModel's sharded state dict with
  exactly those keys (and the GPT layer offsets), so ``dist_checkpointing`` loads the same
  files into either model, at any TP/PP/EP.

Pipeline stages: the pattern gets a ``"|"`` between stages (and virtual stages), each stage
holding whole GPT layers, so both models place the same layers on the same stage.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

ATTENTION, MLP, MOE, PIPE = "*", "-", "E", "|"

__all__ = ["gpt_pattern", "check_gpt_pattern", "is_hybrid_stack", "canonical_layer_index",
           "gpt_keyed_sharded_state_dict"]


def gpt_pattern(num_layers: int, moe_layers: Optional[Sequence[bool]] = None, segments: int = 1) -> str:
    """The hybrid pattern equivalent to a GPT of ``num_layers`` layers (``moe_layers[i]``:
    layer i is MoE), split into ``segments`` pipeline segments of whole GPT layers."""
    if num_layers % segments:
        raise ValueError(f"{num_layers} layers cannot be split into {segments} pipeline segments")
    moe_layers = list(moe_layers) if moe_layers is not None else [False] * num_layers
    if len(moe_layers) != num_layers:
        raise ValueError(f"moe_layers has {len(moe_layers)} entries for {num_layers} layers")
    pairs = [ATTENTION + (MOE if moe else MLP) for moe in moe_layers]
    per = num_layers // segments
    return PIPE.join("".join(pairs[s * per:(s + 1) * per]) for s in range(segments))


def check_gpt_pattern(pattern: str) -> int:
    """Number of GPT layers of a hybrid ``pattern`` made of ("*", "-" or "E") pairs; else a
    clear error (such a pattern has no GPT equivalent, hence no GPT adapter names)."""
    main = pattern.split("/")[0]
    if "/" in pattern:
        raise ValueError(f"hybrid pattern {pattern!r}: multi-token prediction layers are not supported")
    flat = main.replace(PIPE, "")
    pairs = [flat[i:i + 2] for i in range(0, len(flat), 2)]
    bad = [i for i, p in enumerate(pairs) if len(p) != 2 or p[0] != ATTENTION or p[1] not in (MLP, MOE)]
    if bad or any(len(seg) % 2 for seg in main.split(PIPE)):
        raise ValueError(
            f"hybrid pattern {pattern!r}: megatron_mole names adapters by GPT layer, so the pattern "
            f"must be pairs of attention '*' then MLP '-' or MoE 'E' (e.g. '*-*-'), with pipeline "
            f"'|' only between pairs; pair {bad[0] if bad else '?'} is not")
    return len(pairs)


def is_hybrid_stack(module) -> bool:
    """A Megatron HybridStack (the decoder of a HybridModel; 0.19's MambaStack is an alias).
    0.16's MambaStack (MambaModel) is not supported and stays a plain stack here."""
    return type(module).__name__ == "HybridStack" and hasattr(module, "layer_type_list")


def _model_pattern(model) -> Optional[str]:
    return getattr(model, "hybrid_layer_pattern", None)


def canonical_layer_index(layer_number: int, hybrid: bool) -> int:
    """The GPT layer index (0-based) of a layer with Megatron's global ``layer_number``
    (1-based) in a GPT block (itself) or a hybrid stack (pairs: ``(n - 1) // 2``)."""
    return (layer_number - 1) // 2 if hybrid else layer_number - 1


def check_model(model) -> None:
    """Refuses a HybridModel whose pattern has no GPT equivalent (see module docstring)."""
    pattern = _model_pattern(model)
    if pattern is not None:
        check_gpt_pattern(pattern)


def _stacked_layers(ckpt_keys) -> bool:
    # GPT's TransformerBlock stacks homogeneous layers under "decoder.layers.<name>" (a
    # leading layer axis) and keys others per layer ("decoder.layers.<i>.<name>").
    return any(k.startswith("decoder.layers.") and not k.split(".")[2].isdigit() for k in ckpt_keys)


def gpt_keyed_sharded_state_dict(model, ckpt_keys) -> Dict:
    """The HybridModel's sharded state dict with the keys of the equivalent GPTModel's
    checkpoint (``ckpt_keys``: the keys stored, to follow its stacked/per-layer layout).
    Dict keys stay the HybridModel's own state-dict names, so ``load_state_dict`` takes
    what ``dist_checkpointing.load`` returns."""
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    check_model(model)
    num_gpt_layers = model.config.num_layers // 2
    stacked = _stacked_layers(ckpt_keys)
    full = model.sharded_state_dict()
    out = {k: v for k, v in full.items() if not k.startswith("decoder.")}
    # GPTModel stores no (empty) output-layer extra state; neither does its checkpoint.
    extra = out.pop("output_layer._extra_state", None)
    if extra is not None and extra.data:
        raise ValueError(f"the HybridModel's output layer has extra state {extra.data!r}: not in a GPT checkpoint")
    final = {k: v for k, v in full.items() if k.startswith("decoder.final_norm.")}
    replace_prefix_for_sharding(final, "decoder.final_norm.", "decoder.final_layernorm.")
    out.update(final)
    decoder = model.decoder
    for local, layer in enumerate(decoder.layers):
        gpt_layer = canonical_layer_index(layer.layer_number, hybrid=True)
        prefix = f"decoder.layers.{local}."
        if stacked:
            part = layer.sharded_state_dict(prefix, [(0, gpt_layer, num_gpt_layers)], None)
            replace_prefix_for_sharding(part, prefix, "decoder.layers.")
        else:
            part = layer.sharded_state_dict(prefix, [], None)
            replace_prefix_for_sharding(part, prefix, f"decoder.layers.{gpt_layer}.")
        out.update(part)
    return out


def gpt_parameter_name(name: str, model) -> str:
    """A HybridModel parameter's name in the equivalent GPTModel (global layer ids)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"] and parts[2].isdigit():
        layer = model.decoder.layers[int(parts[2])]
        parts[2] = str(canonical_layer_index(layer.layer_number, hybrid=True))
    elif parts[:2] == ["decoder", "final_norm"]:
        parts[1] = "final_layernorm"
    return ".".join(parts)

