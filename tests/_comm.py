"""Bytes one rank moves through collectives, counted at the call sites Megatron and
megatron_mole use (Megatron's mappings and linears bind their all-gather and
reduce-scatter functions at import, so those module attributes are patched too).

Ring costs per rank for a group of p: all-gather and reduce-scatter move (p-1)/p of
the full tensor, all-reduce 2 (p-1)/p of it.
"""
from contextlib import contextmanager

import torch
import torch.distributed as dist


@contextmanager
def collective_bytes(group):
    """Yields a dict {"bytes": n} of bytes this rank sends through collectives over ``group``."""
    from megatron.core.tensor_parallel import layers, mappings

    total = {"bytes": 0.0}
    p = dist.get_world_size(group)
    ring = (p - 1) / p
    saved = []

    def in_group(kwargs):
        g = kwargs.get("group")
        return g is group or (g is not None and dist.get_process_group_ranks(g) == dist.get_process_group_ranks(group))

    def patch(owner, name, nbytes):
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def wrapper(*args, **kwargs):
            if in_group(kwargs):
                total["bytes"] += nbytes(*args)
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    for module in (layers, mappings):
        patch(module, "dist_all_gather_func", lambda out, inp, *a: ring * size(out))
        patch(module, "dist_reduce_scatter_func", lambda out, inp, *a: ring * size(inp))
    patch(dist, "all_reduce", lambda t, *a: 2 * ring * size(t))
    patch(dist, "all_gather", lambda outs, t, *a: ring * p * size(t))
    try:
        yield total
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
