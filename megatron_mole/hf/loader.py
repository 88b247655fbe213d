"""``load_mole_adapter``: an exported MoLE/LoRA adapter inside a transformers model.

The modules injected are the very classes Megatron trains with (layers/), wrapped
around transformers' ``nn.Linear`` modules through the single-device ``NoParallel``
placement: one implementation of routing, dispatch, expert matmuls and the MLP-scope
mixture for training and for inference (``generate()`` included).

- ``lora`` / ``mole_linear`` groups: every Hugging Face linear of the group (q/k/v_proj
  of Megatron's fused ``linear_qkv``, gate/up_proj of ``linear_fc1``, or one linear)
  becomes a :class:`LoRALinear` / :class:`MoLELinear` holding its rows of B. A and the
  router are one Megatron tensor: the wrappers of a group share one ``Parameter``
  (so q, k and v route identically, as the fused Megatron linear does).
- PERFT groups (``perft_s|d|r|e``): the layers/perft.py wrapper around transformers'
  sparse-MoE block (Mixtral ``block_sparse_moe``, Qwen2-MoE ``mlp``); PERFT-E hooks
  the block's fused ``experts`` module (transformers 5.x), which receives the frozen
  router's top-k ids and weights.
- ``mole_mlp`` groups: :class:`MoLEMLP` needs Megatron's fused fc1 ([gate; up]). The
  Hugging Face MLP is replaced by the wrapper around a shim whose ``linear_fc1`` holds
  ``cat([gate.weight, up.weight])``; the separate gate/up weights go away with the
  replaced module, so the frozen weights are not held twice (only during the swap,
  one MLP at a time).

Adapted modules' names change (``...q_proj.base.weight``, ``...mlp.base.linear_fc1.weight``):
the model is meant for inference; merge a one-expert adapter (``export --merge``) for a
plain checkpoint.
"""
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from megatron_mole.hf.format import (AdapterFormatError, check_shared, group_kind, mole_config, read_adapter_dir,
                                     tensor_links)
from megatron_mole.layers import METHODS
from megatron_mole.layers.base import AdapterWrapper
from megatron_mole.layers.mole_mlp import MoLEMLP

__all__ = ["load_mole_adapter", "HFMoLEMLP", "hf_unit_class"]

_ACTIVATIONS = {"silu": F.silu}


class _FusedGatedMLP(nn.Module):
    """A transformers gated MLP seen as Megatron's MLP: ``linear_fc1`` = [gate; up] fused,
    ``linear_fc2`` = down, ``config`` with the activation (what MoLEMLP reads)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation):
        super().__init__()
        fused = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None, device="meta")
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([gate.weight, up.weight]), requires_grad=False)
            if gate.bias is not None:
                fused.bias = nn.Parameter(torch.cat([gate.bias, up.bias]), requires_grad=False)
        self.linear_fc1, self.linear_fc2 = fused, down
        self.config = SimpleNamespace(activation_func=activation, gated_linear_unit=True)


class _TransformersMLPSignature:
    """Mixin: an MLP-unit adapter with transformers' MLP signature (tensor in, tensor out)."""

    def forward(self, x):
        out, _ = super().forward(x.reshape(-1, 1, x.shape[-1]))
        return out.reshape(*x.shape[:-1], out.shape[-1])


_HF_UNITS = {}


def hf_unit_class(cls: type) -> type:
    """``cls`` (an MLP-unit adapter kind's wrapper) with transformers' MLP signature."""
    if cls not in _HF_UNITS:
        _HF_UNITS[cls] = type(f"HF{cls.__name__}", (_TransformersMLPSignature, cls), {})
    return _HF_UNITS[cls]


HFMoLEMLP = hf_unit_class(MoLEMLP)


def _linear(model, name):
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise AdapterFormatError(f"the model has no module {name!r} named by the adapter ({err})") from err
    if not isinstance(module, nn.Linear):
        raise AdapterFormatError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear: "
                                 f"unsupported adapter base")
    return module


def _replace(model, name, module):
    module.train(model.training)  # a model put in eval mode before loading stays there (dropout off)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _load(wrapper, tensors, adapter_dir):
    errors = []
    wrapper.load_full_adapter_tensors(tensors, errors)
    if errors:
        raise AdapterFormatError(f"{adapter_dir}: " + "; ".join(errors))


def _wrap_linears(model, group, cfg, tensors, adapter_dir):
    kind = group_kind(group)
    wrappers = []
    for name in group["hf"]:
        wrapper = kind.wrapper(_linear(model, name), cfg)
        wrapper.adapter_prefix = name
        _load(wrapper, tensors, adapter_dir)
        wrappers.append(wrapper)
    # tensors stored once per HF linear are one Megatron tensor: one Parameter
    # (so q, k and v route identically, as the fused Megatron linear does)
    for t in kind.layout(cfg):
        if t.out_dim is None:
            for wrapper in wrappers[1:]:
                wrapper.tie_param(t.name, wrappers[0].param_of(t.name))
    for name, wrapper in zip(group["hf"], wrappers):
        _replace(model, name, wrapper)


def _wrap_mlp(model, group, cfg, tensors, adapter_dir, hidden_act):
    name = group["hf"]
    if hidden_act not in _ACTIVATIONS:
        raise AdapterFormatError(f"an MLP adapter on {name!r}: hidden_act={hidden_act!r} is not supported "
                                 f"(supported: {sorted(_ACTIVATIONS)})")
    (gate, up), (down,) = group["linears"]["linear_fc1"], group["linears"]["linear_fc2"]
    shim = _FusedGatedMLP(*(_linear(model, f"{name}.{n}") for n in (gate, up, down)), _ACTIVATIONS[hidden_act])
    unit_cls = hf_unit_class(group_kind(group).wrapper)
    unit = unit_cls(shim, cfg, "linear_fc1" in group["adapted"], "linear_fc2" in group["adapted"])
    unit.adapter_prefix = name
    # The unit's own tensor names below the MLP, with fc1's B rows fused back to [gate; up].
    local = {}
    for megatron_name, hf_names, how in tensor_links(group, cfg):
        value = tensors[hf_names[0]] if how == "shared" else torch.cat([tensors[n] for n in hf_names], dim=-2)
        local[name + megatron_name[len(group["megatron"]):]] = value
    _load(unit, local, adapter_dir)
    _replace(model, name, unit)


def _moe_block_name(model, name):
    """The module path of the MoE block the checkpoint calls ``name``: transformers 5.x names
    Mixtral's block ``mlp`` in the module tree while its checkpoints keep ``block_sparse_moe``
    (renamed at load), so a missing name falls back to the one child of the same decoder
    layer that has a ``gate`` and ``experts``."""
    try:
        model.get_submodule(name)
        return name
    except AttributeError as err:
        layer_name = name.rpartition(".")[0]
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            raise AdapterFormatError(f"the model has no MoE block {name!r} named by the adapter ({err})") from err
        found = [f"{layer_name}.{child}" for child, m in layer.named_children()
                 if hasattr(m, "gate") and hasattr(m, "experts")]
        if len(found) != 1:
            raise AdapterFormatError(f"the model has no MoE block {name!r} named by the adapter, and "
                                     f"{layer_name!r} has {len(found)} (gate + experts) blocks") from err
        return found[0]


def _wrap_moe_block(model, group, cfg, tensors, adapter_dir):
    """A PERFT unit around transformers' sparse-MoE block (5.x: fused ``experts`` called with
    the router's top-k ids and weights, which PERFT-E hooks)."""
    name = _moe_block_name(model, group["hf"])
    block = model.get_submodule(name)
    if not hasattr(block, "experts") or not hasattr(block, "gate"):
        raise AdapterFormatError(f"module {name!r} is a {type(block).__name__}, not a transformers sparse-MoE "
                                 f"block (gate + experts): unsupported PERFT base")
    unit = group_kind(group).wrapper(block, cfg, base_config=model.config)
    unit.adapter_prefix = group["hf"]  # the tensors' names (the checkpoint's module names)
    _load(unit, tensors, adapter_dir)
    _replace(model, name, unit)


def _mole_config(config):
    values = dict(config["mole_config"])
    values["dispatch"] = "local"  # one process: every expert is here
    return mole_config(values)


def load_mole_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Inject the adapter exported to ``adapter_dir`` into ``model`` (a transformers
    causal LM of the adapter's base architecture); returns ``model``, adapted in place.

    Errors (:class:`AdapterFormatError`, naming the file, tensor or module): a missing or
    damaged file, another base architecture, a module the model lacks or that is not an
    ``nn.Linear``, a tensor of the wrong shape, an unsupported method or activation, a
    model that already holds adapters.
    """
    config, tensors = read_adapter_dir(adapter_dir)
    base = config.get("base", {})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if base.get("model_type") and model_type != base["model_type"]:
        raise AdapterFormatError(f"{adapter_dir}: the adapter was trained on a {base['model_type']!r} base; "
                                 f"this model has model_type={model_type!r}")
    if config.get("method") not in METHODS:
        raise AdapterFormatError(f"{adapter_dir}: method {config.get('method')!r} is not supported by "
                                 f"load_mole_adapter (registered: {sorted(METHODS)})")
    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise AdapterFormatError("the model already holds adapters; load the adapter into a fresh model")
    cfg = _mole_config(config)
    hidden_act = getattr(model.config, "hidden_act", "silu")
    for group in config["modules"]:
        for _, names, how in tensor_links(group, cfg):
            if how == "shared":
                check_shared(names, tensors)
        if group_kind(group).unit == "moe":
            _wrap_moe_block(model, group, cfg, tensors, adapter_dir)
        elif group_kind(group).unit == "mlp":
            _wrap_mlp(model, group, cfg, tensors, adapter_dir, hidden_act)
        else:
            _wrap_linears(model, group, cfg, tensors, adapter_dir)
    if config.get("multimodal"):  # a LLaVA base: trained projector, Parrot (hf/multimodal.py)
        from megatron_mole.hf.multimodal import load_multimodal

        load_multimodal(model, adapter_dir, config["multimodal"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.mole_adapter_config = config
    return model
