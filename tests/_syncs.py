"""Counting device -> host synchronisations on CPU.

On a GPU these calls wait for the device: ``Tensor.item/tolist/__int__/__float__/__bool__``,
``bincount``, ``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, and
``repeat_interleave`` with tensor repeats but no ``output_size``. CPU runs cannot see the
waits, so :func:`count_host_syncs` patches those entry points and counts the calls made
from megatron_mole's own code (a caller frame inside the package, the CPU runtime's
function mode passed over), so that Megatron's own syncs do not blur the count.
"""
import collections
import sys
from contextlib import contextmanager

import torch


# Frames passed over to find the caller: torch itself, and the CPU runtime's function mode
# (it forwards every torch call; it does not run on GPUs).
_TRANSPARENT = ("torch", "megatron_mole.runtime")


def _from_package(depth=2):
    frame = sys._getframe(depth)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_TRANSPARENT):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("megatron_mole")


@contextmanager
def count_host_syncs():
    """Yields a Counter {call name: count} of host syncs from megatron_mole code."""
    counts = collections.Counter()
    saved = []

    def patch(owner, name, is_sync=lambda *a, **k: True):
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def wrapper(*args, **kwargs):
            if is_sync(*args, **kwargs) and _from_package():
                counts[name] += 1
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)

    def repeats_need_size(*args, **kwargs):
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    def bool_index(self, index, *rest):
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "nonzero", "bincount", "unique",
                 "masked_select"):
        patch(torch.Tensor, name)
    for name in ("bincount", "nonzero", "unique", "masked_select"):
        patch(torch, name)
    patch(torch, "repeat_interleave", repeats_need_size)
    patch(torch.Tensor, "repeat_interleave", repeats_need_size)
    patch(torch.Tensor, "__getitem__", bool_index)
    try:
        yield counts
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
