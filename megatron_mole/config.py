"""MoLEConfig: the one dataclass that describes a Mixture-of-LoRA-Experts adapter.

Validated in ``__post_init__``; every error names the field and the offending
value (an ``errors.ConfigError``, which is a ``ValueError``). Router names are
checked against the registry in ``megatron_mole.routing`` and methods against the
one in ``megatron_mole.layers`` (layers/specs.py), so a router or method registered
there is accepted here without touching this file;
router-specific settings travel in ``router_args``.

Target patterns (``targets``) are matched against each module's dotted path with
*global* layer indices (``decoder.layers.{L}`` with L = Megatron's
``layer_number - 1``, so a pattern means the same thing at every pipeline
layout; in a HybridModel the GPT layer each half belongs to, runtime/hybrid.py):

- a bare name (``linear_fc1``) matches any module whose last path component is
  that name;
- a dotted pattern is matched component by component, ``*`` matching one
  component (or, inside a component, any characters) and ``**`` any number of
  components;
- ``{a-b}`` / ``{a,b,c}`` inside a pattern select layer indices
  (``decoder.layers.{0-3}.**``);
- ``layers`` (a list of global 0-based layer indices) restricts every pattern.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_mole.errors import ConfigError

EXPERT_SCOPES = ("mlp", "linear")
LORA_B_INITS = ("zeros", "random")
BALANCE_SCOPES = ("global", "micro_batch")
# Method names MoLEConfig accepts: the built-in ones (MoLE, PERFT for MoE bases, FactorLLM, CEFT), plus
# every name registered with megatron_mole.layers.register_method (which adds it here; the
# classes live in layers/)
METHOD_NAMES = {"mole", "perft-s", "perft-d", "perft-r", "perft-e", "factorllm", "ceft"}
DISPATCH_MODES = ("auto", "local", "alltoall", "replicated")


@dataclass
class MoLEConfig:
    num_experts: int = 4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    top_k: int = 1
    router: str = "topk"
    router_args: Dict[str, Any] = field(default_factory=dict)
    method: str = "mole"
    targets: List[str] = field(default_factory=lambda: ["linear_fc1", "linear_fc2"])
    layers: Optional[List[int]] = None
    expert_scope: str = "mlp"
    aux_loss_coeff: float = 0.01
    # "global": the balance loss's expert fractions f come from the previous optimizer
    # step's whole global batch (all micro-batches and data-parallel ranks), so the loss
    # does not depend on the DP size or the micro-batch split; "micro_batch": from the
    # micro-batch itself (routing/losses.py)
    balance: str = "global"
    z_loss_coeff: float = 0.0
    lora_b_init: str = "zeros"
    grouped_mm_backend: str = "auto"  # experts/grouped.py: loop for few experts, padded bmm for many
    dispatch: str = "auto"
    # all-to-all only: keep at most ceil(capacity_factor * T*K / E) rows per expert and
    # source rank (lowest gates dropped); None = dropless
    capacity_factor: Optional[float] = None
    # "auto" dispatch: tokens per rank and step assumed by the cost model
    dispatch_tokens_per_rank: int = 4096
    seed: int = 1234

    def __post_init__(self):
        from megatron_mole.experts.grouped import GROUPED_MM_BACKENDS
        from megatron_mole.routing import ROUTERS

        def need(ok, name, what):
            if not ok:
                raise ConfigError(f"MoLEConfig.{name}={getattr(self, name)!r}: {what}")

        for name in ("num_experts", "rank", "top_k", "seed"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                 name, "must be an int")
        need(self.num_experts >= 1, "num_experts", "must be >= 1")
        need(self.rank >= 1, "rank", "must be >= 1")
        need(1 <= self.top_k <= self.num_experts, "top_k",
             f"must be in [1, num_experts={self.num_experts}]")
        need(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", "must be > 0")
        need(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout",
             "must be in [0, 1)")
        need(self.router in ROUTERS, "router", f"unknown router; known: {sorted(ROUTERS)}")
        need(isinstance(self.router_args, dict), "router_args", "must be a dict")
        need(self.method in METHOD_NAMES, "method", f"unknown method; known: {sorted(METHOD_NAMES)}")
        need(self.expert_scope in EXPERT_SCOPES, "expert_scope", f"must be one of {EXPERT_SCOPES}")
        need(self.lora_b_init in LORA_B_INITS, "lora_b_init", f"must be one of {LORA_B_INITS}")
        need(self.grouped_mm_backend in GROUPED_MM_BACKENDS, "grouped_mm_backend",
             f"must be one of {sorted(GROUPED_MM_BACKENDS)}")
        need(self.dispatch in DISPATCH_MODES, "dispatch", f"must be one of {DISPATCH_MODES}")
        need(self.balance in BALANCE_SCOPES, "balance", f"must be one of {BALANCE_SCOPES}")
        need(self.capacity_factor is None
             or (isinstance(self.capacity_factor, (int, float)) and self.capacity_factor > 0),
             "capacity_factor", "must be None (dropless) or a number > 0")
        need(isinstance(self.dispatch_tokens_per_rank, int) and self.dispatch_tokens_per_rank >= 1,
             "dispatch_tokens_per_rank", "must be an int >= 1")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value >= 0, name, "must be a number >= 0")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        need(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets),
             "targets", "must be a non-empty list of non-empty module-name patterns")
        if self.layers is not None:
            self.layers = list(self.layers)
            need(all(isinstance(i, int) and i >= 0 for i in self.layers), "layers",
                 "must be a list of global 0-based layer indices")
        ROUTERS[self.router].check_args(self.router_args, self)

    @property
    def scaling(self) -> float:
        """LoRA's alpha / rank."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> Dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "MoLEConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"MoLEConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

