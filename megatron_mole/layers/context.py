"""The routing context of the current forward pass, supplied by the model.

Megatron's blocks call an adapted linear with its input only, so what a router
may need beyond the features (padding, packed-sequence ids, a conditioning
tensor) travels beside the call: ``apply_mole`` puts a forward pre-hook on the
model that records the ``padding_mask`` Megatron's GPTModel receives ([b, s],
True = padding, before any sequence-parallel scatter), and callers supply the
rest around the forward call::

    with routing_inputs(segment_ids=segment_ids_BS, condition=image_features):
        model(tokens, position_ids, attention_mask, padding_mask=padding_BS)

Wrappers turn it into a :class:`~megatron_mole.routing.RoutingContext` for
their rows (s-major, the full sequence, as routers see it). Without a hook or
inputs (Hugging Face inference, plain modules) the context holds only the
layout, the layer and the mode.

Legend: B batch, S sequence, T = S * B rows (s-major).
"""
from contextlib import contextmanager
from typing import Optional

import torch

from megatron_mole.routing import RoutingContext

_INPUTS = {"padding_mask": None, "segment_ids": None, "condition": None}


@contextmanager
def routing_inputs(padding_mask=None, segment_ids=None, condition=None):
    """Supply routing inputs ([b, s] tensors; ``condition`` any tensor) to the
    adapters for the forward passes run inside the block."""
    saved = dict(_INPUTS)
    _INPUTS.update(padding_mask=padding_mask, segment_ids=segment_ids, condition=condition)
    try:
        yield
    finally:
        _INPUTS.update(saved)


def current_condition():
    """The ``condition`` supplied with :func:`routing_inputs` for this forward, or None."""
    return _INPUTS["condition"]


def record_padding_mask(module, args, kwargs):
    """Forward pre-hook (with kwargs) on a model: keep its ``padding_mask``."""
    # A wrapper model that calls this one without a mask may have left one on it (LLaVA: the
    # padding of the combined image + text sequence, megatron_mole.model).
    _INPUTS["padding_mask"] = kwargs.get("padding_mask", getattr(module, "mole_padding_mask", None))


def forget_padding_mask(module, args, output):
    """Forward hook: the recorded mask belongs to that forward only."""
    _INPUTS["padding_mask"] = None


def install_context_hooks(model: torch.nn.Module) -> None:
    model.register_forward_pre_hook(record_padding_mask, with_kwargs=True)
    model.register_forward_hook(forget_padding_mask)


def _rows(values_BS: Optional[torch.Tensor], seq: int, batch: int) -> Optional[torch.Tensor]:
    if values_BS is None or tuple(values_BS.shape) != (batch, seq):
        return None  # not this forward's layout (e.g. a sequence-parallel shard)
    return values_BS.t().reshape(-1)


def routing_context(x_SBD_shape, layer: Optional[int], training: bool,
                    padding_mask_BS: Optional[torch.Tensor] = None) -> RoutingContext:
    """The context of rows laid out as ``x_SBD_shape`` ([s, b, ...] or [t, ...]).
    ``padding_mask_BS`` (a layer's own argument) is used when the model supplied none."""
    seq, batch = (x_SBD_shape[0], x_SBD_shape[1]) if len(x_SBD_shape) >= 3 else (x_SBD_shape[0], 1)
    padding = _rows(_INPUTS["padding_mask"], seq, batch)
    if padding is None:
        padding = _rows(padding_mask_BS, seq, batch)
    segments = _rows(_INPUTS["segment_ids"], seq, batch)
    return RoutingContext(layer=layer, training=training, seq_len=seq, batch=batch,
                          mask_T=None if padding is None else ~padding.bool(),
                          segment_ids_T=segments, condition=_INPUTS["condition"])
