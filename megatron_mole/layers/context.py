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

Activation recompute: Megatron's ``tensor_parallel.checkpoint`` re-runs a layer in
backward, after the model's forward hook has forgotten these inputs. The guard that
:func:`install_context_hooks` installs (:func:`keep_inputs_under_recompute`) wraps the
function each checkpoint replays: the first call (the forward) runs as is, the replay
runs with the inputs of that forward restored and under ``routing.recomputing()``, so
the router sees the same padding, takes the same decisions, and per-forward statistics
are not counted twice. (Megatron's fp8 path, ``te_checkpoint``, is not wrapped.)

Legend: B batch, S sequence, T = S * B rows (s-major).
"""
from contextlib import contextmanager
from typing import Optional

import torch

from megatron_mole.routing import RoutingContext, recomputing

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
    keep_inputs_under_recompute()


def _active_fork():
    """The RNG-tracker stream Megatron runs in now (its TransformerBlock forks the
    model-parallel stream for the whole block under sequence parallelism), or None."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    name = getattr(tracker, "_current_state_name", None)
    if name in (None, "default-rng") or name not in getattr(tracker, "states_", {}):
        return None
    return tracker, name


@contextmanager
def _in_fork(active):
    """Replay inside the stream the forward ran in, from the live generator state the
    checkpoint restored. (Megatron's replay runs outside the block's fork: a nested fork of
    that stream inside the layer would restart from the tracker's stale saved state.)"""
    if active is None:
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom

    tracker, name = active
    tracker.states_[name] = mrandom._get_cuda_rng_state()
    with tracker.fork(name):
        yield


def _replaying(function):
    """``function`` whose second and later calls (recompute replays) see the routing
    inputs and the RNG stream of the first call."""
    saved = dict(_INPUTS)
    active = _active_fork()
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:
            return function(*args, **kwargs)
        with routing_inputs(**saved), recomputing(), _in_fork(active):
            return function(*args, **kwargs)
    return run


def keep_inputs_under_recompute() -> bool:
    """Wrap Megatron's ``tensor_parallel.checkpoint`` (once per process; any device) so
    that recompute replays see their forward's routing inputs. False without Megatron."""
    try:
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import random as mrandom
    except ImportError:
        return False
    original = tensor_parallel.checkpoint
    if getattr(original, "_mole_keeps_inputs", False):
        return True

    def checkpoint(function, distribute_saved_activations, *args):
        return original(_replaying(function), distribute_saved_activations, *args)

    checkpoint._mole_keeps_inputs = True
    tensor_parallel.checkpoint = mrandom.checkpoint = checkpoint
    return True


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
