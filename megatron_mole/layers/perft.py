"""PERFT (Liu et al., 2024): adapters for Mixture-of-Experts bases.

Methods ``perft-s | perft-d | perft-r | perft-e`` adapt a whole MoE block (Megatron's
``MoELayer``, or a transformers sparse-MoE block) as one unit; the base router and
experts stay frozen. With s = alpha / r and a PEFT expert P_i(x) = s B_i A_i dropout(x)
(D -> r -> D, no activation; A [r, D], B [D, r]):

- **S** (kind ``perft_s``): y = MoE(x) + P(x), one always-on adapter (num_experts = 1).
- **D** (kind ``perft_d``): y = MoE(x) + sum_i P_i(x), M = num_experts always-on adapters.
- **R** (kind ``perft_r``): y = MoE(x) + sum_{i in topK} g_i P_i(x) with the adapter's
  OWN router p = softmax(W x) (W [M, D], no bias, fp32), K = top_k; g = p over the
  chosen K, renormalised exactly when the base renormalises its gates (Megatron:
  softmax after top-k, ``moe_router_pre_softmax=False``, or sigmoid scores; Mixtral
  yes, OLMoE / Qwen2-MoE without ``norm_topk_prob`` no). The public OLMoE code
  multiplies by the *base* router's weights; we follow the paper. Its balance loss is
  ``aux_loss_coeff`` (0.01 default) times the Switch loss of that router. Adapter
  experts are sharded over expert parallelism and reached through our
  ExpertDispatch (dispatch/seam.py), like any MoLE expert.
- **E** (kind ``perft_e``, layers/perft_e.py): one P_e per base expert e, added to
  the expert's output and weighted by the frozen base router's gate.

The S/D/R adapter runs parallel to the block: input = the block's input, output added
to the block's output. Under sequence parallelism the block's input is this TP rank's
sequence chunk; the adapter all-gathers it (backward: split), computes replicated on
every TP rank and keeps its chunk of the output (backward: all-gather), so its
parameters get complete, identical gradients on every TP rank (no extra reduction)
and the router sees the whole sequence at any layout. Megatron's MoE load-balancing
and z losses are switched off for the frozen base router (``apply_mole``): with the
router frozen they would only push gradients into the layers below.

Tensors (below the MoE block's path ``{moe}``): S ``perft.lora_a`` [R, H],
``perft.lora_b`` [H, R]; D the same with a leading [M]; R ``perft.router.weight``
[M, H] and ``perft.lora_a`` [M, R, H], ``perft.lora_b`` [M, H, R] (experts, dim 0 over
EP); trainable parameters per block: S 2HR, D M*2HR, R M*(2HR + H), E E*2HR
(``AdapterKind.trainable_params``).

Legend: T tokens, S rows at this rank's experts, M adapter experts, R rank, H hidden.
"""
import copy
import dataclasses
import torch
import torch.nn.functional as F

from megatron_mole.dispatch.seam import build_dispatch
from megatron_mole.dispatch.sharding import expert_sharding
from megatron_mole.errors import ConfigError
from megatron_mole.experts import LoRAExperts
from megatron_mole.layers.base import AdapterWrapper
from megatron_mole.layers.context import routing_context
from megatron_mole.layers.methods import MoLEMethod
from megatron_mole.layers.parallel import NoParallel
from megatron_mole.layers.specs import (AdapterKind, TensorSpec, UnitDims, register_adapter_kind,
                                        register_method, router_tensors)
from megatron_mole.routing import AUX_LOSS_TRACKER, attach_aux_loss, build_router

PREFIX = "perft"


class BlockPlacement(NoParallel):
    """An adapter parallel to a Megatron MoE block (module docstring): under sequence
    parallelism it sees the gathered sequence and keeps its chunk of the output."""

    def __init__(self, group, sequence_parallel: bool):
        self.group = group
        self.tp_size = group.size() if group is not None else 1
        self.tp_rank = group.rank() if group is not None else 0
        self.sequence_parallel = bool(sequence_parallel) and self.tp_size > 1

    def adapter_input(self, x):
        if not self.sequence_parallel:
            return x
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.group)

    def adapter_output(self, y):
        if not self.sequence_parallel:
            return y
        from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
        return scatter_to_sequence_parallel_region(y, group=self.group)


def block_placement(base):
    """The placement of an adapter parallel to ``base``: Megatron's MoELayer, or a
    single-device module (transformers inference)."""
    group = getattr(base, "attn_tp_group", None)
    if group is None:
        return NoParallel()
    return BlockPlacement(group, getattr(base.config, "sequence_parallel", False))


def base_renormalizes(config) -> bool:
    """Whether a base MoE router renormalises its top-k gates (module docstring).
    Megatron's TransformerConfig, or a transformers config (``norm_topk_prob``;
    Mixtral has none and always renormalises)."""
    if hasattr(config, "moe_router_pre_softmax"):
        score = getattr(config, "moe_router_score_function", "softmax")
        return score == "sigmoid" or not config.moe_router_pre_softmax
    return bool(getattr(config, "norm_topk_prob", True))


def perft_router_config(cfg, base_config):
    """``cfg`` with the "topk" router's ``renormalize`` following the base unless set."""
    if cfg.router != "topk" or "renormalize" in cfg.router_args:
        return cfg
    args = dict(cfg.router_args, renormalize=base_renormalizes(base_config))
    return dataclasses.replace(cfg, router_args=args)


def disable_base_aux_losses(moe_layer) -> None:
    """The frozen base router's Megatron losses off (module docstring), on a copy of the
    config so the rest of the model keeps its own."""
    router = getattr(moe_layer, "router", None)
    if router is None or not hasattr(router, "config"):
        return
    cfg = copy.copy(router.config)
    cfg.moe_aux_loss_coeff = 0.0
    cfg.moe_z_loss_coeff = None
    router.config = cfg


class PerftBlock(AdapterWrapper):
    """Base of the S/D/R wrappers around an MoE block (``base``): runs the block and
    adds ``delta`` of its input."""

    layer_number = None  # global 0-based layer, set by apply_mole
    param_rewrites = {f"{PREFIX}.router.": "router.", f"{PREFIX}.": "adapters."}

    def __init__(self, base, cfg, base_config=None):
        super().__init__()
        self.base, self.cfg = base, cfg
        self.base_config = base_config if base_config is not None else base.config
        disable_base_aux_losses(base)
        self.hidden = int(self.base_config.hidden_size)
        self.place = block_placement(base)
        ref = next(p for p in base.parameters())
        self.dtype, self.device = ref.dtype, ref.device

    def unit_dims(self) -> UnitDims:
        return MoEDims.block(self.hidden)

    def placement_of(self, linear):
        return self.place

    def forward(self, hidden_states, *args, **kwargs):
        res = self.base(hidden_states, *args, **kwargs)
        out, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, None)
        x_full = self.place.adapter_input(hidden_states)
        x_TH = x_full.reshape(-1, self.hidden)
        ctx = routing_context(x_full.shape, self.layer_number, self.training, kwargs.get("padding_mask"))
        y_TH, aux = self.delta(x_TH, ctx)
        y = self.place.adapter_output(y_TH.view(*x_full.shape[:-1], self.hidden))
        out = attach_aux_loss(out + y.to(out.dtype), aux)
        return (out, *rest) if rest is not None else out

    def delta(self, x_TH, ctx):  # pragma: no cover
        raise NotImplementedError


class _Dense(torch.nn.Module):
    """Always-on adapters: A [M, R, H] and B [M, H, R] (M = 1 squeezed for S)."""

    def __init__(self, lead, rank, hidden, dtype, device):
        super().__init__()
        self.lora_a = torch.nn.Parameter(torch.zeros(*lead, rank, hidden, dtype=dtype, device=device))
        self.lora_b = torch.nn.Parameter(torch.zeros(*lead, hidden, rank, dtype=dtype, device=device))


class PerftDense(PerftBlock):
    """PERFT-S (one adapter) and PERFT-D (M adapters summed): sum_i s B_i A_i dropout(x),
    computed as one rank-(M*R) LoRA (the sum of the M products)."""

    kind = "perft_d"

    def __init__(self, base, cfg, base_config=None):
        super().__init__(base, cfg, base_config)
        lead = () if self.kind == "perft_s" else (cfg.num_experts,)
        self.adapters = _Dense(lead, cfg.rank, self.hidden, self.dtype, self.device)

    def delta(self, x_TH, ctx):
        x_TH = self.place.dropout(x_TH, self.cfg.dropout, self.training)
        a, b = self.adapters.lora_a, self.adapters.lora_b
        a_QH = a.reshape(-1, self.hidden)                             # Q = M*R
        b_HQ = b if b.dim() == 2 else b.transpose(0, 1).reshape(self.hidden, -1)
        return F.linear(F.linear(x_TH, a_QH) * self.cfg.scaling, b_HQ), None


class PerftS(PerftDense):
    kind = "perft_s"


class PerftR(PerftBlock):
    """PERFT-R: the adapter's own router over M adapter experts, top-K (module docstring)."""

    kind = "perft_r"

    def __init__(self, base, cfg, base_config=None):
        super().__init__(base, cfg, base_config)
        self.cfg = cfg = perft_router_config(cfg, self.base_config)
        self.router = build_router(self.hidden, cfg, device=self.device)
        per_expert = 2 * self.hidden * cfg.rank
        self.sharding = expert_sharding(cfg, [(self.hidden, self.hidden)], per_expert)
        self.adapters = LoRAExperts(self.sharding.num_local(cfg.num_experts), self.hidden, self.hidden, cfg.rank,
                                    cfg.grouped_mm_backend, self.dtype, self.device)
        # every TP rank holds the whole sequence and its experts are not TP-split: no TP split
        self.dispatch = build_dispatch(cfg, self.sharding, NoParallel(), tp_split=False, out_sharded=False)

    def delta(self, x_TH, ctx):
        routing = self.router(x_TH, ctx)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, routing.logged_stats())
        x_TH = self.place.dropout(x_TH, self.cfg.dropout, self.training)
        x_SH, gates_S, handle = self.dispatch.permute(x_TH, routing)
        AUX_LOSS_TRACKER.record(self.adapter_prefix, handle.stats)
        y_SH = self.adapters.block(x_SH, gates_S * self.cfg.scaling, handle.counts, NoParallel(), 0.0,
                                   self.training)
        return self.dispatch.combine(y_SH, handle), routing.aux_loss


# ---------------------------------------------------------------- kinds
def _ab(cfg, hidden, lead=(), experts=False, linears=(None, None)):
    """A [lead.., R, H] and B [lead.., H, R]; ``linears`` name the placements whose split
    (column: A's R rows; row: B's R columns) applies."""
    off = len(lead)
    b_init = "kaiming" if cfg.lora_b_init == "random" else "zeros"
    return [TensorSpec(f"{PREFIX}.lora_a", lead + (cfg.rank, hidden), in_dim=off + 1, out_dim=off,
                       linear=linears[0], experts=experts, init="kaiming", fan_in=hidden),
            TensorSpec(f"{PREFIX}.lora_b", lead + (hidden, cfg.rank), in_dim=off + 1, out_dim=off,
                       linear=linears[1], experts=experts, init=b_init, fan_in=cfg.rank)]


@dataclasses.dataclass(frozen=True)
class MoEDims(UnitDims):
    """A MoE block's sizes: hidden (in = out) and the base's expert count."""
    num_base_experts: int = 1

    @classmethod
    def block(cls, hidden: int, num_base_experts: int = 1) -> "MoEDims":
        return cls(((None, (hidden, hidden)),), num_base_experts)


class MoEBlockKind(AdapterKind):
    """An adapter kind whose unit is a whole MoE block (``unit = "moe"``)."""

    unit = "moe"

    def trainable_params(self, cfg, hidden: int, num_base_experts: int = 1) -> int:
        """Trainable parameters of one adapted block (full, unsharded)."""
        total = 0
        for t in self.tensors(cfg, MoEDims.block(hidden, num_base_experts)):
            if t.trainable:
                n = 1
                for s in t.shape:
                    n *= s
                total += n
        return total


@register_adapter_kind
class PerftSKind(MoEBlockKind):
    name, wrapper = "perft_s", PerftS

    def tensors(self, cfg, dims):
        return _ab(cfg, dims.of(None)[0])


@register_adapter_kind
class PerftDKind(MoEBlockKind):
    name, wrapper = "perft_d", PerftDense

    def tensors(self, cfg, dims):
        return _ab(cfg, dims.of(None)[0], lead=(cfg.num_experts,))


@register_adapter_kind
class PerftRKind(MoEBlockKind):
    name, wrapper = "perft_r", PerftR

    def tensors(self, cfg, dims):
        hidden = dims.of(None)[0]
        return router_tensors(cfg, hidden, PREFIX) + _ab(cfg, hidden, lead=(cfg.num_experts,), experts=True)


# ---------------------------------------------------------------- methods
class PerftMethod(MoLEMethod):
    """A PERFT method: the MoE blocks whose expert linears the targets name get
    ``moe_kind``; attention linears a plain LoRA and dense MLPs MoLE, as method "mole"."""

    adapts_moe_experts = True
    moe_kind = "?"

    def check(self, cfg) -> None:
        if cfg.method == "perft-s" and cfg.num_experts != 1:
            raise ConfigError(f"MoLEConfig.num_experts={cfg.num_experts}: method 'perft-s' has one adapter; "
                              f"set num_experts=1 (or use 'perft-d' for several always-on adapters)")


def _method(method_name, kind_name):
    cls = type(f"Perft{kind_name[-1].upper()}Method", (PerftMethod,),
               {"name": method_name, "moe_kind": kind_name, "__doc__": f"PERFT: MoE blocks get {kind_name!r}."})
    return register_method(cls)


for _name in ("perft-s", "perft-d", "perft-r", "perft-e"):
    _method(_name, _name.replace("-", "_"))
