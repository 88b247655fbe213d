"""The multimodal part of an exported adapter inside transformers' LlavaForConditionalGeneration.

An adapter exported from a LLaVA base may carry, beside the LM's MoLE adapters:

    multimodal.safetensors   the trained projector (``model.multi_modal_projector.*``, full
                             tensors replacing the base's) and Parrot's MoE (``parrot.*``)
    adapter_config.json      "multimodal": {"projector": bool, "parrot": {sizes} or null,
                             "image_token_id": id}

:func:`load_multimodal` copies the projector in and inserts Parrot after it: the projector
module is replaced by :class:`HFParrotProjection`, which runs the projector, then the very
:class:`~megatron_mole.experts.parrot.ParrotMoE` Megatron trains. Its text input comes from
a forward pre-hook on the Llava model that records ``input_ids`` and ``attention_mask``, and
``generate()`` records them too (transformers 5 computes the image features before the
first forward): the prompt tokens are the attended non-image tokens of the prompt.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from megatron_mole.experts.parrot import ParrotMoE
from megatron_mole.hf.format import AdapterFormatError

__all__ = ["MULTIMODAL_NAME", "HFParrotProjection", "load_multimodal", "parrot_from_config"]

MULTIMODAL_NAME = "multimodal.safetensors"


def parrot_from_config(parrot: dict, dtype=torch.float32, device=None) -> ParrotMoE:
    return ParrotMoE(parrot["hidden_size"], parrot["ffn_hidden_size"], parrot["num_experts"], parrot["alpha"],
                     parrot.get("lora_rank"), parrot.get("lora_alpha"), dtype=dtype, device=device)


class HFParrotProjection(nn.Module):
    """transformers' LLaVA projector followed by Parrot's MoE (image features [N, V, D] in and out)."""

    def __init__(self, base: nn.Module, moe: ParrotMoE, embeddings: nn.Module, image_token: int):
        super().__init__()
        self.base, self.moe = base, moe
        self._embeddings = (embeddings,)
        self.image_token = image_token
        self.inputs = None
        self.prompt_mask = None  # [B, S] in the model's input layout, when the caller knows the prompt

    def forward(self, features_NVD):
        projected = self.base(features_NVD)
        if self.inputs is None or self.inputs[0] is None:
            raise RuntimeError("HFParrotProjection: call the model with input_ids (Parrot needs the prompt)")
        ids_BS, attention_BS = self.inputs
        if projected.shape[0] != ids_BS.shape[0]:
            raise ValueError(f"Parrot: one image per sample is supported; got {projected.shape[0]} images for "
                             f"{ids_BS.shape[0]} samples")
        prompt_BS = ids_BS != self.image_token
        if attention_BS is not None:
            prompt_BS = prompt_BS & attention_BS.bool()
        if self.prompt_mask is not None:  # teacher-forced scoring: the answer is in the input, not the prompt
            prompt_BS = self.prompt_mask.to(prompt_BS.device).bool()
        text_ids = torch.where(ids_BS == self.image_token, torch.zeros_like(ids_BS), ids_BS)
        text_BSD = self._embeddings[0](text_ids).to(projected.dtype)
        return self.moe(projected, text_BSD, prompt_BS)


def _record(module, args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:
        module.multi_modal_projector.inputs = (ids, kwargs.get("attention_mask"))


def _recording_generate(model, projection):
    """transformers' generate() computes the image features before the first forward
    (``mm_encoder_outputs``): record the prompt when generate() is called."""
    original = model.generate

    def generate(*args, **kwargs):
        projection.inputs = (kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask"))
        return original(*args, **kwargs)

    return generate


def load_multimodal(model: nn.Module, adapter_dir: str, section: dict) -> None:
    """Load the projector and Parrot of ``adapter_dir`` into a LlavaForConditionalGeneration."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, MULTIMODAL_NAME)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{path} is missing (named by the adapter's 'multimodal' section)")
    tensors = load_file(path)
    llava = getattr(model, "model", None)
    if llava is None or not hasattr(llava, "multi_modal_projector"):
        raise AdapterFormatError(f"{adapter_dir}: a multimodal adapter needs transformers' "
                                 f"LlavaForConditionalGeneration; got {type(model).__name__}")
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        if name.startswith("parrot."):
            continue
        if name not in params or params[name].shape != value.shape:
            raise AdapterFormatError(f"{path}: tensor {name!r} {list(value.shape)} has no place in the model")
        with torch.no_grad():
            params[name].copy_(value)
    parrot = section.get("parrot")
    if parrot:
        projector = llava.multi_modal_projector
        weight = next(projector.parameters())
        moe = parrot_from_config(parrot, dtype=weight.dtype, device=weight.device)
        state = {k[len("parrot."):]: v for k, v in tensors.items() if k.startswith("parrot.")}
        missing, unexpected = moe.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AdapterFormatError(f"{path}: Parrot tensors missing {missing[:4]} or unexpected {unexpected[:4]}")
        llava.multi_modal_projector = HFParrotProjection(projector, moe, llava.get_input_embeddings(),
                                                         section["image_token_id"])
        llava.register_forward_pre_hook(_record, with_kwargs=True)
        model.generate = _recording_generate(model, llava.multi_modal_projector)
