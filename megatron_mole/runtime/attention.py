"""Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (``sdpa``).

Megatron's local layer spec computes attention as DotProductAttention: the
[b, heads, s, s] scores and probabilities are materialised and kept for backward
(at seq 2048 and 32 heads: 512 MiB per sequence and layer in fp32). This module is
a drop-in ``core_attention`` for that spec: same constructor and forward
signature, same masks (``attention_mask`` True = masked, Megatron's convention;
none with a causal layer = causal), same softmax scale (``apply_query_key_layer_scaling``
cancels out, as in Megatron), GQA without repeating K/V (``enable_gqa``), and
attention dropout drawn from Megatron's model-parallel RNG stream as the local
module does (inside the block's fork under sequence parallelism). torch picks the
kernel: flash or memory-efficient attention on GPUs (no Transformer Engine
needed), its fused CPU kernels or the math path on CPU; none keeps a [heads, s, s]
tensor for backward.

Differences from the local module, by design: a query row whose keys are *all*
masked gives zeros (torch's safe softmax), where Megatron's -10000 fill gives the
mean of all values; such rows (left padding) carry no loss. Sliding windows, softmax
offsets, attention bias and ``packed_seq_params`` are refused (``supports`` says
why, and ``attention="auto"`` then keeps the local module).

:func:`with_core_attention` swaps the module into a layer spec (a ``ModuleSpec``
or a block spec's layer list); ``checkpoint.mcore.build_model`` uses it.

Legend: B batch, S query / K key positions, N heads (local), G query groups, D head dim.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F

ATTENTION_KINDS = ("auto", "local", "sdpa")


def unsupported_reason(config) -> Optional[str]:
    """Why a config cannot use :class:`SdpaAttention` (None: it can)."""
    if getattr(config, "window_size", None) is not None:
        return "sliding-window attention (window_size)"
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        return f"softmax_type={config.softmax_type!r}"
    if getattr(config, "context_parallel_size", 1) != 1:
        return "context parallelism"
    return None


def _module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class SdpaAttention(_module_base()):
    """``core_attention`` of Megatron's layer spec on torch's fused attention."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **unused):
        super().__init__(config=config)
        reason = unsupported_reason(config)
        if reason is not None:
            raise NotImplementedError(f"attention='sdpa' does not support {reason}; use attention='local'")
        from megatron.core.transformer.enums import AttnMaskType

        self._causal_type = AttnMaskType.causal
        self.attn_mask_type = attn_mask_type
        self.layer_number = max(1, layer_number)
        tp = (pg_collection.tp.size() if pg_collection is not None and hasattr(pg_collection, "tp")
              else _tp_size())
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.hidden_per_partition = head_dim * self.heads
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention='sdpa': attention_bias / packed_seq_params are not supported "
                                      "(packing: pass a block-diagonal attention_mask)")
        seq = query.shape[0]
        q_BNSD = query.permute(1, 2, 0, 3)
        k_BGKD, v_BGKD = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask.to(torch.bool)  # sdpa: True = attend
        else:
            causal = mask_type == self._causal_type and seq > 1
        dropout_p = self.dropout_p if self.training else 0.0
        with _dropout_stream(self.config, dropout_p):
            out_BNSD = F.scaled_dot_product_attention(
                q_BNSD, k_BGKD, v_BGKD, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=self.heads != self.groups)
        return out_BNSD.permute(2, 0, 1, 3).reshape(seq, query.shape[1], self.hidden_per_partition)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}  # no parameters (Megatron's local module has none either with softmax_type vanilla)


def _tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


class _dropout_stream:
    """Megatron's local attention draws its dropout from the model-parallel stream
    (under sequence parallelism the whole block already runs in that fork)."""

    def __init__(self, config, p: float):
        self.fork = None
        if p > 0 and not config.sequence_parallel:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

            self.fork = get_cuda_rng_tracker().fork()

    def __enter__(self):
        if self.fork is not None:
            self.fork.__enter__()

    def __exit__(self, *exc):
        if self.fork is not None:
            return self.fork.__exit__(*exc)
        return False


def resolve_attention(attention: str, config) -> str:
    """"local" or "sdpa" for ``attention`` ("auto": sdpa when :func:`unsupported_reason` is None)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}")
    reason = unsupported_reason(config)
    if attention == "auto":
        return "local" if reason is not None else "sdpa"
    if attention == "sdpa" and reason is not None:
        raise NotImplementedError(f"attention='sdpa' does not support {reason}; use attention='local'")
    return attention


def with_core_attention(spec, module=SdpaAttention):
    """A copy of a GPT layer spec (a ModuleSpec, or a block spec with ``layer_specs``)
    whose self-attention computes its core attention with ``module``."""
    spec = copy.deepcopy(spec)
    layers = getattr(spec, "layer_specs", None)
    for layer in (layers if layers is not None else [spec]):
        attention = getattr(layer.submodules, "self_attention", None)
        subs = getattr(attention, "submodules", None)
        if subs is None or not hasattr(subs, "core_attention"):
            raise ValueError(f"layer spec {layer.module} has no self_attention.core_attention to replace")
        subs.core_attention = module
    return spec
