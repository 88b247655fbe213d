"""From a Hugging Face config to the Megatron-core model it corresponds to, exactly.

``spec_from_hf_config`` returns a JSON-able dict (stored as ``mcore_config.json`` next
to the distributed checkpoint) with the ``TransformerConfig`` fields, the ``GPTModel``
arguments, the key-map flags and the shapes the tensor ops need. Anything of the HF
config that Megatron-core's local layer specs cannot reproduce exactly is refused with
an :class:`UnsupportedModelError` naming the field and its value, never approximated:

- rope: ``default``, ``linear`` (Megatron's ``seq_len_interpolation_factor``) and
  ``llama3`` with Megatron's fixed low/high frequency factors 1/4 and original context
  8192; any other ``rope_type`` is refused.
- sliding windows (Mistral, Mixtral): Megatron's ``window_size=(W-1, 0)`` masks exactly
  as transformers' ``kv_idx > q_idx - W``.
- Qwen2-MoE's dense layers (``mlp_only_layers``, ``decoder_sparse_step``) become
  Megatron's ``moe_layer_freq`` pattern (built with ``get_gpt_decoder_block_spec``).
- OLMoE is refused: its q/k RMSNorm spans the whole projection (all heads together);
  Megatron's ``qk_layernorm`` normalises each head separately.

``load_hf_config`` reads a model directory's config.json as plain JSON when that alone
determines the spec (:func:`plain_json_config`), sparing a conversion transformers' ~1 s of
config imports, and through transformers' AutoConfig otherwise.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict

from megatron_mole.errors import CheckpointError, MoleError

__all__ = ["UnsupportedModelError", "ARCHITECTURES", "config_value", "spec_from_hf_config", "check_layout",
           "load_hf_config", "plain_json_config"]


class UnsupportedModelError(MoleError, ValueError):
    """The Hugging Face model uses a feature Megatron-core cannot represent exactly."""


# model_type -> MLP kind of the key map; the attention part is common.
ARCHITECTURES = {
    "llama": "dense",
    "mistral": "dense",
    "qwen2": "dense",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
}

_REFUSED = {
    "olmoe": "OLMoE's q_norm/k_norm normalise the whole query/key projection "
    "(num_heads*head_dim values together); Megatron-core's qk_layernorm normalises each head "
    "separately, so the model cannot be represented exactly",
}


def config_value(cfg, name, default=None):
    """A field of a ``PretrainedConfig`` or of its dict (config.json read as is)."""
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


_get = config_value


def _refuse(model_type, field, value, why):
    raise UnsupportedModelError(f"{model_type}: {field}={value!r} is not supported: {why}")


def _rope(cfg, model_type) -> Dict[str, Any]:
    params = _get(cfg, "rope_parameters") or {}
    if params and not isinstance(params.get("rope_type", params.get("type", "default")), str):
        _refuse(model_type, "rope_parameters", params, "per-layer-type rope parameters")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params["rope_theta"] if "rope_theta" in params else _get(cfg, "rope_theta", 10000.0)
    out = {"rotary_base": theta, "rope_scaling": False, "rope_scaling_factor": 8.0,
           "seq_len_interpolation_factor": None}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        out["seq_len_interpolation_factor"] = float(params["factor"])
        return out
    if rope_type == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for field, megatron_value in fixed.items():
            if float(params.get(field, megatron_value)) != megatron_value:
                _refuse(model_type, f"rope_parameters.{field}", params.get(field),
                        f"Megatron-core's GPTModel fixes it to {megatron_value} for llama3 rope")
        out["rope_scaling"] = True
        out["rope_scaling_factor"] = float(params["factor"])
        return out
    _refuse(model_type, "rope_parameters.rope_type", rope_type,
            "Megatron-core's GPTModel rope supports default, linear and llama3 scaling only")


def _attention(cfg, model_type) -> Dict[str, Any]:
    hidden = _get(cfg, "hidden_size")
    heads = _get(cfg, "num_attention_heads")
    groups = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or hidden // heads
    if _get(cfg, "hidden_act", "silu") != "silu":
        _refuse(model_type, "hidden_act", _get(cfg, "hidden_act"), "only SwiGLU (silu) MLPs are mapped")
    linear_bias = False
    if model_type == "llama":
        # Megatron has q/k/v biases alone (add_qkv_bias) or biases on every linear
        # (add_bias_linear): Llama's attention_bias (q, k, v, o) matches only with mlp_bias.
        attention_bias, mlp_bias = bool(_get(cfg, "attention_bias", False)), bool(_get(cfg, "mlp_bias", False))
        if attention_bias != mlp_bias:
            field = "attention_bias" if attention_bias else "mlp_bias"
            _refuse(model_type, field, True, "Megatron puts biases on all linears or on q/k/v only; "
                    "attention_bias and mlp_bias must both be set")
        linear_bias = attention_bias
    qkv_bias = linear_bias or model_type == "qwen2" or (
        model_type == "qwen2_moe" and bool(_get(cfg, "qkv_bias", True)))
    if _get(cfg, "use_sliding_window", False):
        _refuse(model_type, "use_sliding_window", True,
                "per-layer sliding windows (max_window_layers) are not mapped")
    window = _get(cfg, "sliding_window") if model_type in ("mistral", "mixtral") else None
    return {
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "kv_channels": head_dim,
        "add_qkv_bias": qkv_bias,
        "add_bias_linear": linear_bias,
        # transformers attends to kv_idx > q_idx - W; Megatron keeps q-w0 <= kv <= q.
        "window_size": None if window is None else [int(window) - 1, 0],
        "attention_dropout": float(_get(cfg, "attention_dropout", 0.0) or 0.0),
    }


def _moe(cfg, model_type) -> Dict[str, Any]:
    if model_type == "mixtral":
        return {
            "num_moe_experts": _get(cfg, "num_local_experts"),
            "moe_ffn_hidden_size": _get(cfg, "intermediate_size"),
            "moe_router_topk": _get(cfg, "num_experts_per_tok"),
            # Mixtral renormalises the top-k softmax probabilities: softmax after top-k.
            "moe_router_pre_softmax": False,
            "moe_aux_loss_coeff": float(_get(cfg, "router_aux_loss_coef", 0.0)),
        }
    shared = _get(cfg, "shared_expert_intermediate_size")
    if not shared:
        _refuse(model_type, "shared_expert_intermediate_size", shared, "the shared expert is always present")
    # transformers makes layer i dense (an MLP of intermediate_size) when i is in
    # mlp_only_layers or (i+1) is not a multiple of decoder_sparse_step; Megatron takes
    # the same pattern as moe_layer_freq (1: MoE, 0: dense of ffn_hidden_size).
    step, dense = _get(cfg, "decoder_sparse_step", 1) or 1, set(_get(cfg, "mlp_only_layers") or ())
    pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(_get(cfg, "num_hidden_layers"))]
    out = {} if all(pattern) else {"moe_layer_freq": pattern}
    return {
        **out,
        "num_moe_experts": _get(cfg, "num_experts"),
        "moe_ffn_hidden_size": _get(cfg, "moe_intermediate_size"),
        "moe_router_topk": _get(cfg, "num_experts_per_tok"),
        # Without norm_topk_prob the gates are the plain softmax probabilities of the top-k.
        "moe_router_pre_softmax": not bool(_get(cfg, "norm_topk_prob", False)),
        "moe_aux_loss_coeff": float(_get(cfg, "router_aux_loss_coef", 0.0)),
        "moe_shared_expert_intermediate_size": shared,
        "moe_shared_expert_gate": True,
    }


def spec_from_hf_config(cfg, tp: int = 1, vocab_divisor: int = 128) -> Dict[str, Any]:
    """The Megatron model of an HF config (a ``PretrainedConfig`` or its dict).

    The vocabulary is padded to a multiple of ``vocab_divisor * tp`` as Megatron-LM does
    (``make_vocab_size_divisible_by``), so the checkpoint loads at that TP and its divisors.
    """
    model_type = _get(cfg, "model_type")
    if model_type in _REFUSED:
        raise UnsupportedModelError(f"{model_type}: unsupported: {_REFUSED[model_type]}")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unknown architecture model_type={model_type!r} (architectures={_get(cfg, 'architectures')}); "
            f"supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    mlp_kind = ARCHITECTURES[model_type]
    if vocab_divisor < 1:
        raise ValueError(f"vocab_divisor must be >= 1; got {vocab_divisor}")
    vocab = _get(cfg, "vocab_size")
    multiple = vocab_divisor * tp
    padded_vocab = int(math.ceil(vocab / multiple) * multiple)
    tied = bool(_get(cfg, "tie_word_embeddings", False))

    transformer = {
        "num_layers": _get(cfg, "num_hidden_layers"),
        "ffn_hidden_size": _get(cfg, "intermediate_size"),
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(_get(cfg, "rms_norm_eps")),
        "gated_linear_unit": True,
        "hidden_dropout": 0.0,
        # Fusions need CUDA kernels; a GPU run may switch them on through overrides.
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
    }
    transformer.update(_attention(cfg, model_type))
    if mlp_kind != "dense":
        transformer.update(_moe(cfg, model_type))
        transformer["moe_router_load_balancing_type"] = "aux_loss"
        transformer["moe_token_dispatcher_type"] = "alltoall"
        transformer["moe_grouped_gemm"] = False
    gpt = {
        "vocab_size": padded_vocab,
        "max_sequence_length": _get(cfg, "max_position_embeddings"),
        "position_embedding_type": "rope",
        "share_embeddings_and_output_weights": tied,
    }
    gpt.update(_rope(cfg, model_type))
    return {
        "architecture": model_type,
        "mlp_kind": mlp_kind,
        "activation": "silu",
        "transformer": transformer,
        "gpt": gpt,
        "flags": {
            "untied": not tied,
            "qkv_bias": transformer["add_qkv_bias"],
            "linear_bias": transformer["add_bias_linear"],
            "shared_expert_gate": bool(transformer.get("moe_shared_expert_gate", False)),
        },
        "shapes": {
            "num_query_groups": transformer["num_query_groups"],
            "num_attention_heads": transformer["num_attention_heads"],
            "kv_channels": transformer["kv_channels"],
            "hf_vocab_size": vocab,
            "padded_vocab_size": padded_vocab,
            "num_experts": transformer.get("num_moe_experts") or 0,
        },
    }


def check_layout(spec, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """Refuse a TP/PP/EP layout the model's sizes do not divide, naming the sizes."""
    t, shapes = spec["transformer"], spec["shapes"]
    checks = [
        ("tp", tp, "num_attention_heads", t["num_attention_heads"]),
        ("tp", tp, "num_query_groups", t["num_query_groups"]),
        ("tp", tp, "ffn_hidden_size", t["ffn_hidden_size"]),
        ("tp", tp, "padded vocab_size", shapes["padded_vocab_size"]),
        ("pp", pp, "num_layers", t["num_layers"]),
    ]
    if shapes["num_experts"]:
        checks.append(("ep", ep, "num_moe_experts", shapes["num_experts"]))
        checks.append(("tp", tp, "moe_ffn_hidden_size", t["moe_ffn_hidden_size"]))
    for axis, size, field, value in checks:
        if value % size != 0:
            raise ValueError(f"{axis}={size} does not divide {field}={value}")


class _ConfigReads(dict):
    """config.json as read; records the fields looked up that it lacks (where transformers'
    config class would supply its own default)."""

    def __init__(self, raw):
        super().__init__(raw)
        self.missing = set()

    def get(self, key, default=None):
        if key not in self:
            self.missing.add(key)
        return super().get(key, default)


# Fields whose absence gives the spec the value every mapped config class gives it: classes
# without sliding windows have no use_sliding_window (Qwen2's defaults to False, as here),
# and head_dim defaults to hidden_size // num_attention_heads in each class that has one.
_SAME_DEFAULT = {"use_sliding_window", "head_dim"}


def plain_json_config(path: str):
    """config.json as a dict when it alone determines the Megatron spec, else None.

    Importing transformers' config classes costs ~1 s (its lazy module scan), a fixed cost
    of every conversion. A plain read gives the same spec when the architecture is one
    ``spec_from_hf_config`` maps, the rope parameters are in transformers 5's standard form
    (``rope_parameters``; a legacy ``rope_scaling`` is normalised by transformers) and no field the spec
    reads is missing (no class default involved). Anything else goes through AutoConfig,
    with its validation and errors.
    """
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError:
        return None  # AutoConfig reports it
    if not isinstance(raw, dict) or raw.get("model_type") not in ARCHITECTURES or raw.get("rope_scaling") is not None:
        return None
    rope = raw.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_type" not in rope:
        return None
    reads = _ConfigReads(raw)
    try:
        spec_from_hf_config(reads)
    except Exception:  # noqa: BLE001  (refused or odd: AutoConfig's path says why)
        return None
    return None if reads.missing - _SAME_DEFAULT else raw


def load_hf_config(hf_dir: str):
    """The model's config: a plain dict when that suffices (:func:`plain_json_config`), else
    transformers' AutoConfig."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{hf_dir}: config.json is missing")
    plain = plain_json_config(path)
    if plain is not None:
        return plain
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_dir)
    except (KeyError, ValueError) as err:
        with open(path) as f:
            raw = json.load(f)
        raise CheckpointError(
            f"{path}: unknown architecture model_type={raw.get('model_type')!r} "
            f"(architectures={raw.get('architectures')}): {err}"
        ) from err
