"""Parrot between the projector and the language model of a Megatron LLaVAModel.

``apply_parrot(model, ...)`` replaces ``model.vision_projection`` (first pipeline stage) by a
:class:`ParrotProjection`: the original projector (child ``base``, its parameter names gain
``.base``) followed by :class:`~megatron_mole.experts.parrot.ParrotMoE` (child ``moe``). The
MoE needs, per sample, the raw text embeddings of the prompt: a forward pre-hook on the
LLaVAModel records its ``input_ids`` and ``loss_mask``; the wrapper looks the ids up in the
language model's own word embeddings (vocabulary-parallel: all-reduced over TP, so every
TP rank computes the same mixture; the MoE's tensors are replicated, their gradients equal
on every TP rank) and takes as prompt tokens the text tokens outside the loss
(``loss_mask == 0``; every text token when no loss mask is given, as at inference). A
caller that knows better (padding) passes the mask itself:
``with routing_inputs(condition=prompt_mask_BS): model(...)``.

``set_parrot_stage(model, stage)``: Parrot's two training stages. 1: only the projector
trains and the MoE is bypassed; 2: the MoE, the projector and the language model's
adapters train (the LLM is trained through its MoLE adapters here); the vision tower stays
frozen in both.

Legend: B batch (one image per sample), S text sequence, V visual tokens, D hidden.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_mole.experts.parrot import ParrotMoE
from megatron_mole.layers import context

__all__ = ["ParrotProjection", "apply_parrot", "set_parrot_stage", "parrot_module"]


class ParrotProjection(nn.Module):
    """The LLaVA projector followed by Parrot's text-guided MoE (see the module docstring)."""

    def __init__(self, base: nn.Module, moe: ParrotMoE, word_embeddings: nn.Module, image_token: int):
        super().__init__()
        self.base, self.moe = base, moe
        self._embeddings = (word_embeddings,)  # not a child: the LM owns (and saves) it
        self.image_token = image_token
        self.enabled = True
        self.inputs = None  # (input_ids_BS, loss_mask_BS) of the current forward

    def forward(self, hidden_VBD):
        projected_VBD = self.base(hidden_VBD)
        if not self.enabled:
            return projected_VBD
        if self.inputs is None:
            raise RuntimeError("ParrotProjection: no input_ids recorded: call the LLaVAModel, not its projector")
        ids_BS, loss_mask_BS = self.inputs
        batch = ids_BS.shape[0]
        images_per_sample = (ids_BS == self.image_token).sum(-1)
        if projected_VBD.shape[1] != batch or bool((images_per_sample != 1).any()):
            raise ValueError(f"Parrot: one image per sample is supported; got {projected_VBD.shape[1]} images for "
                             f"{batch} samples with {images_per_sample.tolist()} image tokens")
        prompt_BS = context.current_condition()
        if prompt_BS is None or tuple(prompt_BS.shape) != tuple(ids_BS.shape):
            prompt_BS = ids_BS != self.image_token
            if loss_mask_BS is not None:
                prompt_BS = prompt_BS & (loss_mask_BS == 0)
        text_ids = torch.where(ids_BS == self.image_token, torch.zeros_like(ids_BS), ids_BS)
        text_BSD = self._embeddings[0](text_ids)
        mixed_BVD = self.moe(projected_VBD.transpose(0, 1), text_BSD.to(projected_VBD.dtype), prompt_BS.bool())
        return mixed_BVD.transpose(0, 1).contiguous()


def parrot_module(model) -> Optional[ParrotProjection]:
    projection = getattr(model, "vision_projection", None)
    return projection if isinstance(projection, ParrotProjection) else None


def _record_inputs(module, args, kwargs):
    wrapper = parrot_module(module)
    if wrapper is not None:
        ids = kwargs.get("input_ids", args[1] if len(args) > 1 else None)
        loss_mask = kwargs.get("loss_mask", args[5] if len(args) > 5 else None)
        wrapper.inputs = (ids, loss_mask)


def _forget_inputs(module, args, output):
    wrapper = parrot_module(module)
    if wrapper is not None:
        wrapper.inputs = None


def apply_parrot(model, num_experts: int = 6, ffn_hidden_size: Optional[int] = None, alpha: float = 0.1,
                 lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None, seed: int = 1234):
    """Insert Parrot into a Megatron LLaVAModel (see the module docstring); returns the model.
    ``ffn_hidden_size``: each expert's hidden size (default: the LM's ffn_hidden_size).
    The MoE's tensors are drawn from ``seed`` in full, so every layout starts identically."""
    if not hasattr(model, "vision_projection") or not hasattr(model, "language_model"):
        raise TypeError(f"apply_parrot: needs Megatron's LLaVAModel, got {type(model).__name__}")
    if parrot_module(model) is not None:
        raise ValueError("apply_parrot: the model already has Parrot")
    config = model.language_model.config
    ffn = ffn_hidden_size or config.ffn_hidden_size
    model.parrot_config = dict(num_experts=num_experts, ffn_hidden_size=ffn, alpha=alpha, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, seed=seed, hidden_size=config.hidden_size)
    if model.vision_projection is None:  # a later pipeline stage: nothing to insert here
        return model
    param = next(model.vision_projection.parameters())
    moe = ParrotMoE(config.hidden_size, ffn, num_experts, alpha, lora_rank, lora_alpha, seed=seed,
                    dtype=param.dtype, device=param.device)
    model.vision_projection = ParrotProjection(model.vision_projection, moe,
                                               model.language_model.embedding.word_embeddings,
                                               model.image_token_index)
    model.register_forward_pre_hook(_record_inputs, with_kwargs=True)
    model.register_forward_hook(_forget_inputs)
    return model


def set_parrot_stage(model, stage: int) -> None:
    """Parrot's training stage 1 (projector only, MoE bypassed) or 2 (MoE + projector + the LM's
    adapters); the vision tower and the base LM weights stay frozen."""
    from megatron_mole.layers.base import AdapterWrapper

    if stage not in (1, 2):
        raise ValueError(f"set_parrot_stage: stage must be 1 or 2; got {stage!r}")
    chunks = model if isinstance(model, (list, tuple)) else [model]
    adapter_params = [p for chunk in chunks for m in chunk.modules() if isinstance(m, AdapterWrapper)
                      for p in m.parameters()]
    for p in adapter_params:  # what apply_mole made trainable (router state stays frozen)
        if not hasattr(p, "mole_trainable"):
            p.mole_trainable = p.requires_grad
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
        if chunk.vision_projection is not None:
            for p in chunk.vision_projection.parameters():
                p.requires_grad_(True)
        wrapper = parrot_module(chunk)
        if wrapper is not None:
            wrapper.enabled = stage == 2
            for p in wrapper.moe.parameters():
                p.requires_grad_(stage == 2)
    for p in adapter_params:
        p.requires_grad_(stage == 2 and p.mole_trainable)
