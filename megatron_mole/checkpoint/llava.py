"""LLaVA bases: transformers' ``LlavaForConditionalGeneration`` <-> Megatron-core's ``LLaVAModel``.

The spec of a LLaVA base is the language model's own spec (``transformer``, ``gpt``, ``flags``,
``shapes``: everything that reads a GPT spec reads the LM's) plus a ``vision`` section (the
CLIP ViT's ``TransformerConfig`` fields) and a ``llava`` section (image size, patch, image
token, projector). What is notable:

* HF LLaVA takes the vision features from ``hidden_states[vision_feature_layer]`` (-2 in
  LLaVA-1.5: the last ViT layer and ``post_layernorm`` never run). Megatron's CLIPViTModel
  returns its last layer's output, so it is built with only the layers HF uses; the unused
  HF tensors are carried verbatim beside the checkpoint (:data:`UNUSED_NAME`) and written
  back on export, so the round trip is bit-exact.
* The ViT layer spec is Megatron's local ViT spec with *bidirectional* attention
  (``AttnMaskType.no_mask``, as CLIP): megatron-core 0.16's local ViT spec says causal
  (0.19 fixed it), which is not what HF CLIP computes.
* ``vision_feature_select_strategy="default"`` drops the CLS token: Megatron's
  ``drop_vision_class_token``. The projector is Megatron's ``MultimodalProjector`` ("mlp":
  fc1 -> activation -> fc2, biases as ``multimodal_projector_bias``).
* Input convention: HF expands ``<image>`` into ``image_seq_length`` image tokens in the
  text; Megatron's LLaVAModel takes ONE image token per image and expands it itself
  (:func:`megatron_input_ids` / :func:`hf_input_ids` convert).

Refused (UnsupportedModelError naming the field): several feature layers, other vision
towers than CLIP, other projector activations than gelu / quick_gelu / silu, linear rope
scaling (LLaVAModel does not pass it to its GPTModel).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_mole.checkpoint import keymaps
from megatron_mole.checkpoint.spec import UnsupportedModelError, spec_from_hf_config

__all__ = ["UNUSED_NAME", "is_llava_spec", "llava_spec_from_hf_config", "build_llava_model", "vit_layer_spec",
           "llava_rule_instances", "adapter_rule_instances", "unused_hf_keys", "megatron_input_ids", "hf_input_ids", "ACTIVATIONS"]

UNUSED_NAME = "hf_unused.safetensors"


def quick_gelu(x):
    """CLIP's activation (transformers' QuickGELUActivation)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu}


def is_llava_spec(spec) -> bool:
    return spec.get("architecture") == "llava"


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _refuse(field, value, why):
    raise UnsupportedModelError(f"llava: {field}={value!r} is not supported: {why}")


def llava_spec_from_hf_config(cfg, tp: int = 1, vocab_divisor: int = 128) -> Dict[str, Any]:
    """The Megatron LLaVAModel of an HF ``LlavaConfig`` (object or dict)."""
    text, vision = _get(cfg, "text_config"), _get(cfg, "vision_config")
    spec = spec_from_hf_config(text, tp=tp, vocab_divisor=vocab_divisor)
    if spec["mlp_kind"] != "dense":
        _refuse("text_config.model_type", spec["architecture"], "only dense language models are mapped")
    if spec["gpt"].get("seq_len_interpolation_factor"):
        _refuse("text_config.rope_parameters", "linear", "LLaVAModel does not pass linear rope scaling on")
    if _get(vision, "model_type") not in ("clip_vision_model",):
        _refuse("vision_config.model_type", _get(vision, "model_type"), "only CLIP vision towers are mapped")
    layers = _get(vision, "num_hidden_layers")
    feature_layer = _get(cfg, "vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        _refuse("vision_feature_layer", feature_layer, "Megatron's LLaVAModel takes one feature layer")
    used = layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= layers:
        _refuse("vision_feature_layer", feature_layer, f"selects {used} of {layers} layers")
    strategy = _get(cfg, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        _refuse("vision_feature_select_strategy", strategy, "default or full only")
    vision_act = _get(vision, "hidden_act", "quick_gelu")
    projector_act = _get(cfg, "projector_hidden_act", "gelu")
    for field, act in (("vision_config.hidden_act", vision_act), ("projector_hidden_act", projector_act)):
        if act not in ACTIVATIONS:
            _refuse(field, act, f"one of {sorted(ACTIVATIONS)}")
    heads, hidden = _get(vision, "num_attention_heads"), _get(vision, "hidden_size")
    spec["language_architecture"] = spec["architecture"]
    spec["architecture"] = "llava"
    spec["vision"] = {
        "num_layers": used,
        "hidden_size": hidden,
        "ffn_hidden_size": _get(vision, "intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "kv_channels": hidden // heads,
        "normalization": "LayerNorm",
        "layernorm_epsilon": float(_get(vision, "layer_norm_eps", 1e-5)),
        "add_bias_linear": True,
        "add_qkv_bias": True,
        "gated_linear_unit": False,
        "hidden_dropout": 0.0,
        "attention_dropout": float(_get(vision, "attention_dropout", 0.0) or 0.0),
        "bias_activation_fusion": False,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
        "gradient_accumulation_fusion": False,
        "bias_dropout_fusion": False,
    }
    size, patch = _get(vision, "image_size"), _get(vision, "patch_size")
    spec["llava"] = {
        "img_h": size,
        "img_w": size,
        "patch_dim": patch,
        "image_token_index": _get(cfg, "image_token_id", _get(cfg, "image_token_index")),
        "drop_class_token": strategy == "default",
        "image_seq_length": (size // patch) ** 2 + (0 if strategy == "default" else 1),
        "vision_activation": vision_act,
        "projector_activation": projector_act,
        "projector_bias": bool(_get(cfg, "multimodal_projector_bias", True)),
        "vision_hf_layers": layers,
    }
    spec["shapes"]["vision_heads"] = heads
    spec["shapes"]["vision_head_dim"] = hidden // heads
    spec["flags"]["projector_bias"] = spec["llava"]["projector_bias"]
    return spec


def vit_layer_spec():
    """Megatron's local ViT layer (LayerNorm, biases, plain MLP) with bidirectional attention."""
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    layer = copy.deepcopy(get_vit_layer_with_local_spec())
    attention = layer.submodules.self_attention
    attention.params = dict(attention.params or {}, attn_mask_type=AttnMaskType.no_mask)
    return layer


def _layout():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def build_llava_model(spec: Dict[str, Any], params_dtype: torch.dtype, device=None,
                      config_overrides: Optional[Dict[str, Any]] = None, vp_stage=None,
                      max_sequence_length: Optional[int] = None, parallel_output: bool = True,
                      perform_initialization: bool = False):
    """Megatron-core's LLaVAModel of ``spec`` at the current layout (weights not initialised).

    The vision tower and projector live on the first pipeline stage (with the first LM
    layers), as Megatron-LM places them. ``max_sequence_length``: the combined (image +
    text) length; under pipeline parallelism LLaVAModel pads every batch to it, so a
    pipeline run sets it to its sequence length.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mole.checkpoint.mcore import restore_tensor_parallel_attributes
    from megatron_mole.checkpoint.spec import check_layout

    if vp_stage is not None:
        raise ValueError("LLaVA bases do not support a virtual pipeline")
    tp, pp = _layout()
    check_layout(spec, tp, pp, 1)
    if spec["vision"]["num_attention_heads"] % tp:
        raise ValueError(f"tp={tp} does not divide the vision tower's num_attention_heads="
                         f"{spec['vision']['num_attention_heads']}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    common = dict(tensor_model_parallel_size=tp, params_dtype=params_dtype,
                  bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
                  use_cpu_initialization=on_cpu, perform_initialization=perform_initialization)
    language = dict(spec["transformer"], **common, pipeline_model_parallel_size=pp,
                    pipeline_dtype=params_dtype if pp > 1 else None, sequence_parallel=False,
                    activation_func=ACTIVATIONS[spec["activation"]])
    if language.get("window_size") is not None:
        language["window_size"] = tuple(language["window_size"])
    language.update(config_overrides or {})
    language_config = TransformerConfig(**language)
    llava = spec["llava"]
    vision_config = TransformerConfig(**spec["vision"], **common, pipeline_model_parallel_size=1,
                                      activation_func=ACTIVATIONS[llava["vision_activation"]])
    # LLaVAModel reads the tower's type from its config (Megatron-LM sets it from --vision-model-type).
    vision_config.vision_model_type = "clip"
    text_hidden = spec["transformer"]["hidden_size"]
    projection_config = TransformerConfig(
        num_layers=1, hidden_size=text_hidden, ffn_hidden_size=text_hidden,
        num_attention_heads=spec["transformer"]["num_attention_heads"], add_bias_linear=llava["projector_bias"],
        gated_linear_unit=False, activation_func=ACTIVATIONS[llava["projector_activation"]],
        bias_activation_fusion=False, gradient_accumulation_fusion=False, pipeline_model_parallel_size=1,
        **common)
    from megatron_mole.runtime import compat

    gpt = spec["gpt"]
    first, last = ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    model = LLaVAModel(
        language_transformer_config=language_config,
        language_transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        language_vocab_size=gpt["vocab_size"],
        language_max_sequence_length=max_sequence_length or gpt["max_sequence_length"],
        vision_transformer_config=vision_config,
        vision_transformer_layer_spec=vit_layer_spec(),
        drop_vision_class_token=llava["drop_class_token"],
        vision_projection_config=projection_config,
        vision_projection_layer_spec=compat.local_mlp_submodules(),
        vision_projection_type="mlp",
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=gpt["share_embeddings_and_output_weights"],
        language_position_embedding_type="rope",
        pre_process=first, post_process=last, add_encoder=first, add_decoder=True,
        img_h=llava["img_h"], img_w=llava["img_w"], patch_dim=llava["patch_dim"],
        language_rotary_base=gpt["rotary_base"], language_rope_scaling=gpt.get("rope_scaling", False),
        language_rope_scaling_factor=gpt.get("rope_scaling_factor", 8.0),
        image_token_index=llava["image_token_index"],
    )
    if not hasattr(model, "model_type"):
        # Megatron's schedules read it; the tower shares the first stage with the LM (0.16 lacks it).
        from megatron.core.transformer.enums import ModelType

        model.model_type = ModelType.encoder_or_decoder
    restore_tensor_parallel_attributes(model)
    # CLIPViTModel builds its patch conv (and the torch LayerNorms) in torch's default dtype.
    model.to(params_dtype)
    if not on_cpu:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------
# Key map: the LM's rules under ``language_model.``, the vision tower's and the projector's.
# ---------------------------------------------------------------------------------------

_VL = "vision_model.decoder.layers.{}."
_HVL = "vision_tower.encoder.layers.{}."


def _vision_rules(layer: int) -> List[keymaps.Rule]:
    m, h = _VL.format(layer), _HVL.format(layer)
    rules = [keymaps.Rule(m + "self_attention.linear_qkv." + kind,
                          tuple(h + f"self_attn.{p}_proj.{kind}" for p in "qkv"), "vision_qkv")
             for kind in ("weight", "bias")]
    pairs = {"input_layernorm": "layer_norm1", "pre_mlp_layernorm": "layer_norm2",
             "self_attention.linear_proj": "self_attn.out_proj", "mlp.linear_fc1": "mlp.fc1",
             "mlp.linear_fc2": "mlp.fc2"}
    for ours, theirs in pairs.items():
        rules += [keymaps.Rule(m + f"{ours}.{kind}", (h + f"{theirs}.{kind}",)) for kind in ("weight", "bias")]
    return rules


_VISION_HEAD = (
    keymaps.Rule("vision_model.conv1.weight", ("vision_tower.embeddings.patch_embedding.weight",)),
    keymaps.Rule("vision_model.class_token", ("vision_tower.embeddings.class_embedding",), "class_token"),
    keymaps.Rule("vision_model.position_embeddings.weight", ("vision_tower.embeddings.position_embedding.weight",)),
    keymaps.Rule("vision_model.ln_pre.weight", ("vision_tower.pre_layrnorm.weight",)),
    keymaps.Rule("vision_model.ln_pre.bias", ("vision_tower.pre_layrnorm.bias",)),
)
_PROJECTOR = tuple(
    keymaps.Rule(f"vision_projection.encoder.linear_fc{i}.{kind}", (f"multi_modal_projector.linear_{i}.{kind}",),
                 when="" if kind == "weight" else "projector_bias")
    for i in (1, 2) for kind in ("weight", "bias")
)


def _prefixed(instances, mcore_prefix, hf_prefix):
    return [keymaps.RuleInstance(tuple(mcore_prefix + n for n in i.mcore), tuple(hf_prefix + n for n in i.hf), i.op)
            for i in instances]


def llava_rule_instances(spec) -> list:
    """All rule instances in streaming order: vision tower, projector, LM embedding, LM layers, the rest."""
    flags = spec["flags"]
    vision = keymaps.expand_rules(_VISION_HEAD + _PROJECTOR, flags)
    for layer in range(spec["vision"]["num_layers"]):
        vision += keymaps.expand_rules(_vision_rules(layer), flags)
    lm_rules = keymaps.rules_for("dense")
    head = keymaps.expand_rules(lm_rules, flags, None)
    layers = []
    for layer in range(spec["transformer"]["num_layers"]):
        layers += keymaps.expand_rules(lm_rules, flags, layer)
    first = [i for i in head if i.mcore[0].startswith("embedding.")]
    last = [i for i in head if not i.mcore[0].startswith("embedding.")]
    return vision + _prefixed(first + layers + last, "language_model.", "language_model.")


def adapter_rule_instances(spec) -> list:
    """The LM's rules with Megatron names relative to the language model (where ``apply_mole``
    puts the adapters: ``decoder.layers.{L}...``) and transformers' in-memory module names of
    a LlavaForConditionalGeneration (``model.language_model.layers.{L}...``)."""
    out = []
    for inst in llava_rule_instances(spec):
        if not inst.mcore[0].startswith("language_model.decoder."):
            continue
        hf = tuple("model.language_model." + h[len("language_model.model."):] for h in inst.hf)
        out.append(keymaps.RuleInstance(tuple(m[len("language_model."):] for m in inst.mcore), hf, inst.op))
    return out


def unused_hf_keys(spec, keys) -> List[str]:
    """HF tensors LLaVA never runs (ViT layers past the feature layer, its post_layernorm)."""
    used = spec["vision"]["num_layers"]
    out = []
    for key in keys:
        if key.startswith("vision_tower.post_layernorm."):
            out.append(key)
        elif key.startswith("vision_tower.encoder.layers."):
            if int(key.split(".")[3]) >= used:
                out.append(key)
    return out


# ---------------------------------------------------------------------------------------
# Input conventions.
# ---------------------------------------------------------------------------------------


def megatron_input_ids(hf_ids_BS: torch.Tensor, image_token: int) -> List[torch.Tensor]:
    """HF ids (each image expanded to its tokens) -> Megatron ids (one token per image), per sample."""
    out = []
    for row in hf_ids_BS:
        is_image = row == image_token
        starts = is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])
        out.append(row[~is_image | starts])
    return out


def hf_input_ids(ids_BS: torch.Tensor, image_token: int, image_seq_length: int) -> torch.Tensor:
    """Megatron ids (one token per image) -> HF ids (each image token repeated ``image_seq_length`` times)."""
    rows = [torch.repeat_interleave(row, torch.where(row == image_token, image_seq_length, 1)) for row in ids_BS]
    return torch.stack(rows)
