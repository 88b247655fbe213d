"""Everything that differs between the supported Megatron-core releases (0.16.x to 0.19.x).

This is the only module that looks at Megatron-core's version or at APIs that moved;
the rest of the package calls these helpers. What differs:

* 0.19 turned the local GPT layer spec's MLP entry from a ``ModuleSpec`` into a
  ``functools.partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(...))``:
  :func:`local_mlp_submodules` returns the ``MLPSubmodules`` from either.
* ``HybridModel`` (``megatron.core.models.hybrid``: a layer pattern such as ``"*-*-"``,
  attention and MLP as separate layers, ``"|"`` between pipeline stages) exists from
  0.19 on. 0.16 has only ``MambaModel``, whose stack spec builds Transformer Engine
  modules, so megatron_mole supports HybridModel on >= 0.19 only:
  :func:`hybrid_unavailable_reason` says why not, :func:`build_hybrid_model` builds one
  from the same local layer spec a GPTModel uses (identical modules, identical math).
* The torch_dist writer collects its results through a ``multiprocessing.Manager`` queue
  that it starts with the *spawn* method on first use (``_get_write_results_queue`` in
  0.16, ``get_write_results_queue(mp_mode)`` in 0.19): a fresh interpreter that re-imports
  torch, ~3-7 s per process on 2 CPU cores, most of a small conversion's time.
  :func:`prime_checkpoint_writer` starts that queue's Manager by *fork* instead (it runs
  only multiprocessing code, no torch or CUDA; the writer itself forks its workers).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

__all__ = [
    "megatron_version",
    "version_tuple",
    "have_transformer_engine",
    "local_mlp_submodules",
    "spec_submodules",
    "hybrid_unavailable_reason",
    "build_hybrid_model",
    "prime_checkpoint_writer",
]

HYBRID_MIN_VERSION = (0, 19)


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def version_tuple(version: Optional[str] = None) -> tuple:
    """"0.19.2" -> (0, 19, 2); pre-release suffixes ("0.20.0rc1") keep their number."""
    version = megatron_version() if version is None else version
    parts = []
    for piece in version.split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        parts.append(int(digits or 0))
    return tuple(parts)


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def spec_submodules(entry):
    """The ``submodules`` of a layer-spec entry: a ``ModuleSpec`` (<= 0.18) or, from 0.19, a
    ``functools.partial(Module, submodules=...)`` (the same object: editing it edits the spec)."""
    if isinstance(entry, functools.partial):
        return entry.keywords["submodules"]
    return entry.submodules


def local_mlp_submodules():
    """``MLPSubmodules`` (linear_fc1/linear_fc2 classes) of Megatron's local GPT layer spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return spec_submodules(get_gpt_layer_local_spec().submodules.mlp)


def hybrid_unavailable_reason() -> Optional[str]:
    """None when HybridModel can be built here, else why not."""
    if version_tuple()[:2] < HYBRID_MIN_VERSION:
        return (f"HybridModel needs megatron-core >= {'.'.join(map(str, HYBRID_MIN_VERSION))} "
                f"(found {megatron_version()}; 0.16 has only MambaModel, whose stack spec "
                f"needs Transformer Engine)")
    return None


def build_hybrid_model(config, layer_spec, pattern: str, moe_layer_spec=None, **model_kwargs):
    """Megatron's ``HybridModel`` whose attention ("*"), MLP ("-") and MoE ("E") layers are
    built from ``layer_spec``, a GPT layer spec (``TransformerLayer`` submodules): its
    norm + self-attention become the attention layer, its norm + MLP the MLP layer; the MoE
    layer takes its norm + MoE block from ``moe_layer_spec`` (default: ``layer_spec``).
    ``model_kwargs`` are GPTModel-style keyword arguments (vocab_size, rope, ...)."""
    reason = hybrid_unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    sub = layer_spec.submodules
    # The local spec stores its norms under Transformer Engine's names (input_layernorm ->
    # self_attention.linear_qkv.layer_norm_*); the hybrid layers keep that map, so their
    # checkpoint keys are those of the GPT layer they are half of.
    keys_map = dict(getattr(sub, "sharded_state_dict_keys_map", None) or {})
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=sub.input_layernorm, self_attention=sub.self_attention,
        self_attn_bda=sub.self_attn_bda, sharded_state_dict_keys_map=keys_map))

    def mlp_part(spec):
        s = spec.submodules
        keys = dict(getattr(s, "sharded_state_dict_keys_map", None) or {})
        return TransformerLayerSubmodules(pre_mlp_layernorm=s.pre_mlp_layernorm, mlp=s.mlp, mlp_bda=s.mlp_bda,
                                          sharded_state_dict_keys_map=keys)

    stack = ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        attention_layer=attention,
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp_part(layer_spec)),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=mlp_part(moe_layer_spec or layer_spec))))
    kwargs = dict(model_kwargs)
    kwargs.pop("transformer_layer_spec", None)
    return HybridModel(config, hybrid_stack_spec=stack, hybrid_layer_pattern=pattern, **kwargs)


def prime_checkpoint_writer() -> None:
    """Start the torch_dist writer's results-queue Manager by fork (see the module docstring);
    a no-op once it exists, or when this release keeps the queue elsewhere."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
