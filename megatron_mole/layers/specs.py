"""One registered spec per adapter kind, and the method registry.

An :class:`AdapterKind` alone states the facts about one kind of adapter unit:
its tensors' export names, full shapes, which dim holds the input or output
features (so the TP split follows the base layer: a column-parallel base splits
the output dim, a row-parallel base the input dim; layers/parallel.py), which
are expert-stacked (dim 0 split over expert parallelism), their init, how they
sit on the Hugging Face side (output-row tensors are split by the base
converter's op, the others stored once per HF linear) and the trainable
parameter count at any layout. The wrappers (Megatron and Hugging Face alike),
export/import (checkpoint/adapters.py, hf/format.py, hf/loader.py), the memory
estimate (training/memory.py) and the dispatch cost model read it.

A :class:`Method` (``MoLEConfig.method``) decides which kind adapts a matched
linear; ``apply_mole`` and the memory estimate ask it. A new adapter kind or
method is one class plus its registration::

    @register_adapter_kind
    class MyKind(AdapterKind):
        name, unit, wrapper = "my_kind", "linear", MyWrapper
        def tensors(self, cfg, dims): ...

Legend: E experts, R rank, I in, O out, H hidden, F ffn, F1 fc1 out.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ADAPTER_KINDS: Dict[str, "AdapterKind"] = {}
METHODS: Dict[str, "Method"] = {}


@dataclass(frozen=True)
class TensorSpec:
    """One adapter tensor of a unit.

    ``name``: export name below the unit's prefix. ``linear``: the base linear
    whose placement shards it (``None``: the unit's only linear). ``in_dim`` /
    ``out_dim``: dims holding the base linear's input / output features.
    ``experts``: dim 0 indexes experts. ``router``: an fp32 router parameter.
    ``trainable``: False for state saved with the adapter but not optimised.
    """
    name: str
    shape: Tuple[int, ...]
    in_dim: Optional[int] = None
    out_dim: Optional[int] = None
    linear: Optional[str] = None
    experts: bool = False
    router: bool = False
    init: str = "kaiming"
    fan_in: int = 1
    trainable: bool = True

    @property
    def per_linear(self) -> bool:
        """Stored under the linear's own name (``{linear}.{...}``) rather than the unit's."""
        return self.linear is not None and self.name.startswith(self.linear + ".")

    def split_dim(self, kind: str) -> Optional[int]:
        """The dim split over TP under a base of placement ``kind``."""
        return {"column": self.out_dim, "row": self.in_dim}.get(kind)

    def local_numel(self, kind: str, tp: int, ep: int) -> int:
        """Elements held by one rank (TP split by the base, experts over ``ep``)."""
        shape = list(self.shape)
        dim = self.split_dim(kind)
        if dim is not None:
            shape[dim] //= tp
        if self.experts:
            shape[0] //= ep
        out = 1
        for n in shape:
            out *= n
        return out


@dataclass(frozen=True)
class UnitDims:
    """Full feature sizes of a unit: ``linears`` maps each adapted base linear
    (or ``None`` for a single-linear unit) to its (in, out)."""
    linears: Tuple[Tuple[Optional[str], Tuple[int, int]], ...]

    @classmethod
    def linear(cls, d_in: int, d_out: int) -> "UnitDims":
        return cls(((None, (d_in, d_out)),))

    def of(self, linear: Optional[str]) -> Tuple[int, int]:
        return dict(self.linears)[linear]


def _b_init(cfg) -> str:
    return "kaiming" if cfg.lora_b_init == "random" else "zeros"


def router_tensors(cfg, d_in: int, prefix: str, linear: Optional[str] = None) -> List[TensorSpec]:
    """The tensors of ``cfg.router`` (listed by the router class itself)."""
    from megatron_mole.routing import ROUTERS

    return [TensorSpec(f"{prefix}.router.{t.name}", tuple(t.shape), in_dim=t.in_dim, linear=linear,
                       router=True, init=t.init, fan_in=t.fan_in or d_in, trainable=t.trainable)
            for t in ROUTERS[cfg.router].all_tensor_specs(d_in, cfg)]


def lora_tensors(cfg, d_in: int, d_out: int, prefix: str, linear: Optional[str] = None,
                 experts: bool = False) -> List[TensorSpec]:
    """A [R, I] and B [O, R] (with a leading expert dim when ``experts``)."""
    r, lead = cfg.rank, ((cfg.num_experts,) if experts else ())
    off = len(lead)
    return [TensorSpec(f"{prefix}.lora_a", lead + (r, d_in), in_dim=off + 1, linear=linear, experts=experts,
                       init="kaiming", fan_in=d_in),
            TensorSpec(f"{prefix}.lora_b", lead + (d_out, r), out_dim=off, linear=linear, experts=experts,
                       init=_b_init(cfg), fan_in=r)]


class AdapterKind:
    """Base of the adapter kinds (see the module docstring)."""

    name: str = "?"
    unit: str = "linear"           # "linear": one base linear; "mlp": a dense MLP (fc1, fc2); "moe": a MoE block
    wrapper: type = None           # the module class (Megatron and Hugging Face)
    input_linear: Optional[str] = None  # the linear whose input a unit-level tensor sees

    def tensors(self, cfg, dims: UnitDims) -> List[TensorSpec]:  # pragma: no cover
        raise NotImplementedError

    def layout(self, cfg) -> List[TensorSpec]:
        """The tensors with placeholder sizes: names and roles only (export formats)."""
        probe = UnitDims(tuple((lin, (1, 1)) for lin in self.probe_linears()))
        return self.tensors(cfg, probe)

    def probe_linears(self) -> Tuple[Optional[str], ...]:
        return (None,)

    def expert_params(self, cfg, dims: UnitDims) -> int:
        """Parameters of one expert (full, unsharded): what all-to-all saves per expert."""
        per = 0
        for t in self.tensors(cfg, dims):
            if t.experts:
                n = 1
                for s in t.shape[1:]:
                    n *= s
                per += n
        return per


def _register(registry: dict, what: str, cls):
    instance = cls()
    if instance.name in registry:
        raise ValueError(f"{what} {instance.name!r} is already registered")
    registry[instance.name] = instance
    return cls


def register_adapter_kind(cls):
    """Class decorator: register an AdapterKind (by its ``name``)."""
    return _register(ADAPTER_KINDS, "adapter kind", cls)


class Method:
    """Which adapter kind adapts a matched base linear (``MoLEConfig.method``).

    ``kind_for(cfg, linear, in_dense_mlp)`` returns a kind name; ``linear`` is
    the matched module's last path component, ``in_dense_mlp`` whether its
    parent is a dense Megatron MLP. ``adapts_moe_experts``: whether linears
    inside routed MoE experts may be targeted; a MoE block whose expert linears
    are targeted then becomes one unit of kind ``moe_kind`` (unit ``"moe"``).
    ``check(cfg)`` raises a ConfigError for settings the method refuses.
    """

    name: str = "?"
    adapts_moe_experts = False
    # A method that is not a walk over linears (e.g. "factorllm") defines
    # ``apply_model(model, cfg, options) -> model``; ``apply_mole`` then calls only that.
    apply_model = None
    moe_kind: Optional[str] = None

    def check(self, cfg) -> None:
        """Refuse ``cfg`` settings this method cannot honour (ConfigError naming the field)."""

    def kind_for(self, cfg, linear: str, in_dense_mlp: bool) -> str:  # pragma: no cover
        raise NotImplementedError


def register_method(cls):
    """Class decorator: register a Method (by its ``name``; MoLEConfig then accepts it)."""
    from megatron_mole.config import METHOD_NAMES

    _register(METHODS, "method", cls)
    METHOD_NAMES.add(cls.name)
    return cls


def kind_of(name: str) -> AdapterKind:
    if name not in ADAPTER_KINDS:
        raise KeyError(f"unknown adapter kind {name!r}; known: {sorted(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[name]
