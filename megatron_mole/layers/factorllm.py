"""FactorLLM on Megatron-core: the router of a factorised MoE layer and the training hook.

A factorised checkpoint (``megatron-mole factorize``, checkpoint/factorize.py) is a
converted base whose dense MLPs are Megatron's own ``MoELayer`` (SequentialMLP experts,
sharded over expert parallelism like any Megatron MoE) with ``FactorLLMRouter`` (:func:`router_class`) in
place of ``TopKRouter``: fp32 logits ``W x + b`` (a bias, which TopKRouter lacks without
``add_bias_linear`` on every linear), the top-K experts, each weighted by the constant
N/K (routing/factorllm.py). Token dispatch, expert compute and combine are Megatron's.

Training (``method: factorllm``, :func:`apply_factorllm`): a forward hook on every
MoELayer adds ``pa_loss_coeff * L_PA + balance_loss_coeff * L_balance`` to the training
loss through ``AuxLossScaler`` (the router's only gradient: the output weights are
constant). The PA loss needs every expert's output on every token: the hook all-gathers
the layer's own MLP input over the expert tensor-and-model-parallel group (no gradient), runs
this rank's experts on all of it, sums their partial outputs over expert tensor parallelism
(Megatron's expert fc2 is row-parallel with the reduction left to the dispatcher), compares
with the frozen dense FFN (the teacher, rebuilt once from the untrained experts, whose
concatenation *is* the dense FFN: every neuron shard of every expert, gathered) and
all-gathers the per-expert errors back over EP. The teacher lives in the hook object, not
in the module tree: it is never trained, never in a state dict, and gone when the hooks
are removed.

Tensor parallelism: Megatron trains MoE layers at TP > 1 with sequence parallelism only
(``load_model`` turns it on), so each TP rank sees a sequence slice of the MLP input. Each
rank's losses are its tokens' sums over the valid tokens of the *whole* micro-batch (counts
and the balance loss's expert fractions summed over TP, no gradient), the router's weight
and bias carry Megatron's ``sequence_parallel`` flag, and ``finalize_model_grads`` sums
their gradients over TP: every TP rank gets the TP1 gradient. The padding mask (the
training loop puts the micro-batch's on the model under SP, which Megatron cannot take as
``padding_mask`` there) is sliced to the rank's sequence shard. Any TP (with SP), PP, EP, DP.

Legend: T tokens, D hidden, N experts, n local experts, m neurons per expert.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron_mole.errors import ConfigError
from megatron_mole.layers.context import install_context_hooks, routing_context
from megatron_mole.layers.specs import Method, register_method
from megatron_mole.routing import AUX_LOSS_TRACKER
from megatron_mole.routing import factorllm as F
from megatron_mole.routing.losses import _valid, assignment_counts, attach_aux_loss, load_balancing_loss

TRAINABLE = ("experts+routers", "routers", "adapters+routers")
EXPERT_LINEARS = ("linear_fc1", "linear_fc2")


_ROUTER_CLASS = []


def router_class():
    """:class:`FactorLLMRouter`, defined on first use (importing this module must not import
    Megatron-core: the method registry is read by configs)."""
    if _ROUTER_CLASS:
        return _ROUTER_CLASS[0]
    from megatron.core.transformer.moe.router import TopKRouter

    class FactorLLMRouter(TopKRouter):
        """TopKRouter with a bias and FactorLLM's selection: probs are N/K on the top-K
        experts of ``W x + b`` (fp32), 0 elsewhere. No Megatron aux loss is applied."""

        def __init__(self, config, pg_collection=None, **kwargs):  # 0.19 adds is_mtp_layer=
            super().__init__(config=config, pg_collection=pg_collection, **kwargs)
            if self.bias is None:
                self.bias = torch.nn.Parameter(torch.zeros(config.num_moe_experts, dtype=self.weight.dtype,
                                                           device=self.weight.device))
                setattr(self.bias, "sequence_parallel", config.sequence_parallel)
            self.scale = F.output_scale(config.num_moe_experts, self.topk)

        def gating(self, input):
            return F.router_logits(input, self.weight, self.bias)

        def routing(self, logits, padding_mask=None):
            logits_TN = logits.reshape(-1, self.config.num_moe_experts)
            chosen_TK = F.select(logits_TN, self.topk)
            probs_TN = torch.zeros_like(logits_TN).scatter_(1, chosen_TK, self.scale)
            return probs_TN, probs_TN > 0

    _ROUTER_CLASS.append(FactorLLMRouter)
    return FactorLLMRouter


def factorllm_layer_spec(layer_spec):
    """``layer_spec`` (Megatron's local MoE layer spec) with FactorLLMRouter as its router."""
    from megatron_mole.runtime.compat import spec_submodules

    moe = spec_submodules(layer_spec.submodules.mlp)
    if not hasattr(moe, "router"):
        raise RuntimeError("this megatron-core's MoESubmodules has no 'router' field; FactorLLM needs it")
    moe.router = router_class()
    return layer_spec


def moe_layers(model) -> List[Tuple[int, torch.nn.Module]]:
    """(global 0-based layer number, MoELayer) of every FactorLLM layer of a model chunk."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [(int(m.layer_number) - 1, m.mlp) for m in model.modules()
            if isinstance(getattr(m, "mlp", None), MoELayer) and hasattr(m, "layer_number")
            and isinstance(m.mlp.router, router_class())]


@dataclass
class FactorLLMOptions:
    """The weights of FactorLLM's losses and what trains (the train config's ``factorllm:``)."""
    pa_loss_coeff: float = 0.05
    balance_loss_coeff: float = 0.01
    trainable: str = "experts+routers"

    def __post_init__(self):
        for name in ("pa_loss_coeff", "balance_loss_coeff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"factorllm.{name}={value!r}: must be a number >= 0")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"factorllm.trainable={self.trainable!r}: must be one of {TRAINABLE}")


def _groups():
    """{name: (group, size, rank)} of the groups the hook talks over: ``ep`` (experts), ``etp``
    (the neuron shards of one expert), ``tp_ep`` (both: the ranks whose tokens the experts see)
    and ``tp`` (the sequence slices of one micro-batch under SP)."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, get in (("ep", ps.get_expert_model_parallel_group), ("etp", ps.get_expert_tensor_parallel_group),
                      ("tp_ep", ps.get_expert_tensor_and_model_parallel_group),
                      ("tp", ps.get_tensor_model_parallel_group)):
        group = get()
        size = torch.distributed.get_world_size(group) if group is not None else 1
        out[name] = (group, size, torch.distributed.get_rank(group) if size > 1 else 0)
    return out


def _all_gather(x: torch.Tensor, group, size: int, dim: int = 0) -> torch.Tensor:
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _all_reduce(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Sum over ``group`` (no gradient: counts, statistics, partial expert outputs)."""
    if size > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x, group=group)
    return x


def expert_linears(expert):
    """(fc1, fc2) base linears of a Megatron expert MLP, under a LoRA wrapper or not."""
    return tuple(getattr(lin, "base", lin) for lin in (expert.linear_fc1, expert.linear_fc2))


class _Teacher:
    """The frozen dense SwiGLU FFN: every neuron shard of every expert, gathered over expert
    tensor and expert parallelism, concatenated (the order of neurons does not matter)."""

    def __init__(self, moe, groups):
        group, size, _ = groups["tp_ep"]
        experts = moe.experts.local_experts
        # [n, 2m', D]: [gate; up] of this rank's m' = m/etp neurons (Megatron's SwiGLU shard); [n, D, m']
        fc1_nFD = torch.stack([expert_linears(e)[0].weight.detach() for e in experts])
        fc2_nDm = torch.stack([expert_linears(e)[1].weight.detach() for e in experts])
        fc1_NFD = _all_gather(fc1_nFD, group, size)
        fc2_NDm = _all_gather(fc2_nDm, group, size)
        gate, up = fc1_NFD.chunk(2, dim=1)
        self.gate_FD = gate.reshape(-1, gate.shape[-1]).clone()
        self.up_FD = up.reshape(-1, up.shape[-1]).clone()
        self.down_DF = fc2_NDm.permute(1, 0, 2).reshape(fc2_NDm.shape[1], -1).clone()
        self.activation = experts[0].activation_func

    def __call__(self, x_TD):
        h = self.activation(x_TD @ self.gate_FD.t()) * (x_TD @ self.up_FD.t())
        return h @ self.down_DF.t()


class _PAHook:
    """Forward hook of one MoELayer: attaches the PA and balance losses while training."""

    def __init__(self, moe, options: FactorLLMOptions, layer: int):
        self.moe, self.options, self.layer = moe, options, layer
        self.name = f"decoder.layers.{layer}.mlp"
        self.groups = _groups()
        self.sequence_parallel = bool(moe.config.sequence_parallel) and self.groups["tp"][1] > 1
        self.teacher = _Teacher(moe, self.groups)

    def errors(self, x_TD):
        """Per-expert errors [T, N] of this rank's tokens (all experts, no gradient)."""
        group, size, rank = self.groups["tp_ep"]
        with torch.no_grad():
            x_all = _all_gather(x_TD, group, size)
            teacher_all = _all_gather(self.teacher(x_TD), group, size)
            scale = self.moe.router.scale
            outs = torch.stack([expert(x_all)[0] for expert in self.moe.experts.local_experts], dim=1)
            outs = _all_reduce(outs, *self.groups["etp"][:2])  # partial sums over the neuron shards
            err_all = F.expert_errors(outs, teacher_all, scale)  # [tp*ep*T, n]
            err_all = _all_gather(err_all, *self.groups["ep"][:2], dim=1)  # [tp*ep*T, N], global expert order
            return err_all[rank * x_TD.shape[0]:(rank + 1) * x_TD.shape[0]]

    def mask(self, hidden):
        """Valid-token mask [T] of this rank's rows (None: all valid)."""
        if not self.sequence_parallel:
            return routing_context(hidden.shape, self.layer, True).mask_T
        _, tp, rank = self.groups["tp"]
        full = routing_context((hidden.shape[0] * tp, *hidden.shape[1:]), self.layer, True).mask_T
        rows = hidden.shape[0] * hidden.shape[1]  # s-major: this rank's sequence slice is contiguous
        return None if full is None else full[rank * rows:(rank + 1) * rows]

    def __call__(self, module, args, kwargs, output):
        if not (module.training and torch.is_grad_enabled()):
            return output
        hidden = args[0] if args else kwargs["hidden_states"]
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        # padding from the model's forward (install_context_hooks), as for the MoLE routers
        mask_T = self.mask(hidden)
        router, tp = module.router, self.groups["tp"][:2]
        logits_TN = F.router_logits(x_TD, router.weight, router.bias)
        errors_TN = self.errors(x_TD)
        chosen_TK = F.select(logits_TN, router.topk)
        # over the whole micro-batch (all TP ranks' sequence slices): this rank's share of the mean
        valid_T = _valid(mask_T, x_TD.shape[0], x_TD.device).float()
        count = _all_reduce(valid_T.sum(), *tp)
        share = valid_T.sum() / count.clamp(min=1.0)
        counts_N, used = assignment_counts(chosen_TK, logits_TN.shape[-1], mask_T)
        f_N = _all_reduce(counts_N, *tp) / _all_reduce(used, *tp).clamp(min=1.0)
        pa = F.pa_loss(logits_TN, errors_TN, router.topk, mask_T) * share
        balance = load_balancing_loss(torch.softmax(logits_TN, -1), chosen_TK, mask_T, f_E=f_N) * share
        total = self.options.pa_loss_coeff * pa + self.options.balance_loss_coeff * balance
        with torch.no_grad():
            best = torch.topk(-errors_TN, router.topk, -1).indices.sort(-1).values
            agree = ((best == chosen_TK.sort(-1).values).all(-1).float() * valid_T).sum()
            stats = _all_reduce(torch.stack([pa, balance, total, agree / count.clamp(min=1.0)]), *tp)
        # recorded when the losses are attached: under full recompute that is the replay only
        AUX_LOSS_TRACKER.record(self.name, dict(zip(("pa_loss", "balance_loss", "aux_loss", "prior_agreement"),
                                                    stats.unbind())), replay=True)
        y, bias = output
        return attach_aux_loss(y, total), bias


def _expert_adapters(moe, layer: int, cfg) -> None:
    """A LoRA (kind ``lora``, layers/linear.py: ``W x + (alpha/r) B A x``) on fc1 and/or fc2 (those
    in ``cfg.targets``) of this rank's experts, named and seeded by the global expert id (so
    every EP layout starts alike), reduced like the expert weights they adapt (``allreduce``). At expert
    TP > 1 the LoRA is split like its expert's neurons (``ExpertTPPlacement``, layers/parallel.py), so
    :func:`merged_expert_adapters` merges each rank's weight shard with its shard of ``B A``."""
    from megatron_mole.layers.parallel import ExpertTPPlacement, NoParallel, fc1_stride
    from megatron_mole.layers.specs import kind_of
    from megatron_mole.layers.base import mark_parallel_attributes

    etp = moe.experts.tp_group.size() if getattr(moe.experts, "tp_group", None) is not None else 1
    if cfg.dropout:
        raise ConfigError(f"mole.dropout={cfg.dropout}: FactorLLM's expert adapters take no dropout (the PA "
                          f"loss's per-expert errors run the adapted experts and must not be random)")
    names = [n for n in EXPERT_LINEARS if n in cfg.targets]
    if not names or set(cfg.targets) - set(EXPERT_LINEARS):
        raise ConfigError(f"mole.targets={cfg.targets!r}: FactorLLM's expert adapters adapt {list(EXPERT_LINEARS)} "
                          f"of every expert; name one or both")
    for local, expert in enumerate(moe.experts.local_experts):
        for name in names:
            base = getattr(expert, name)
            # etp = 1: the expert's linear is whole on this rank (its "explicit expert comm" is the
            # dispatcher's); etp > 1: its neurons are split over expert TP (layers/parallel.py)
            place = (ExpertTPPlacement(base, fc1_stride(expert) if name == "linear_fc1" else None)
                     if etp > 1 else NoParallel())
            wrapper = kind_of("lora").wrapper(base, cfg, place)
            wrapper.adapter_prefix = (f"decoder.layers.{layer}.mlp.experts.local_experts."
                                      f"{moe.local_expert_indices[local]}.{name}")
            wrapper.layer_number = layer
            wrapper.init_adapters(cfg.seed)
            mark_parallel_attributes(wrapper)  # the split factor's tensor_model_parallel (grad norm)
            for param in wrapper.lora.parameters():
                param.allreduce = getattr(base.weight, "allreduce", True)
            setattr(expert, name, wrapper)


def expert_adapter_wrappers(chunks) -> List[Tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(expert MLP, linear name, LoRA wrapper) of every expert adapter of the model chunks."""
    out = []
    for chunk in chunks:
        for _, moe in moe_layers(chunk):
            for expert in moe.experts.local_experts:
                out += [(expert, name, getattr(expert, name)) for name in EXPERT_LINEARS
                        if hasattr(getattr(expert, name), "lora")]
    return out


@contextmanager
def merged_expert_adapters(chunks, merge: bool = True):
    """Inside: every expert LoRA folded into its linear, ``W + (alpha/r) B A`` (computed in
    float64, rounded once to W's dtype), the wrapper swapped for the plain linear, so the model
    is a plain factorised model (``save_model``, then ``convert mcore-to-hf`` and
    ``load_factorllm`` as for any factorised checkpoint). ``merge=False``: the wrappers are only
    taken out (Megatron's ``sharded_state_dict`` of the other params). The wrappers and the base
    weights (the very tensors, untouched) are put back on exit."""
    swaps = []
    try:
        with torch.no_grad():
            for expert, name, wrapper in expert_adapter_wrappers(chunks):
                base, lora = wrapper.base, wrapper.lora
                original = base.weight
                if merge:
                    delta = wrapper.cfg.scaling * (lora.lora_b.double() @ lora.lora_a.double())
                    merged = torch.nn.Parameter((original.double() + delta).to(original.dtype), requires_grad=False)
                    for attr, value in vars(original).items():  # Megatron's allreduce / tensor_model_parallel
                        setattr(merged, attr, value)
                    base.weight = merged
                swaps.append((expert, name, wrapper, original))
                setattr(expert, name, base)
        yield
    finally:
        for expert, name, wrapper, original in swaps:
            wrapper.base.weight = original
            setattr(expert, name, wrapper)


def trained_param_descriptions(chunks) -> dict:
    """{chunk-local param name: Megatron's own sharded description} of the trainable params that are
    not adapter tensors (the routers; the experts when they train): what a training checkpoint must
    hold beside the adapters and the optimizer state to resume a FactorLLM run at any layout. (The
    descriptions carry the global keys and offsets; Megatron's keys alone repeat over layers.)"""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    trainable = {id(p): f"{i}.{name}" for i, chunk in enumerate(chunks)
                 for name, p in chunk.named_parameters() if p.requires_grad}
    out = {}
    with merged_expert_adapters(chunks, merge=False):  # Megatron's experts cannot describe our wrappers
        for chunk in chunks:
            for value in nested_values(chunk.sharded_state_dict()):
                name = trainable.get(id(getattr(value, "data", None)))
                if name is not None:
                    out[name] = value
    return out


def apply_factorllm(model, options: Optional[FactorLLMOptions] = None, cfg=None):
    """Prepare a factorised model for FactorLLM training: freeze all but the experts and
    routers (or the routers only, or the routers and LoRA adapters on the frozen experts, whose
    rank, alpha, seed and targets come from the MoLEConfig ``cfg``), hook the PA and balance
    losses. Returns the hook handles."""
    options = options or FactorLLMOptions()
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("method 'factorllm' needs a factorised base (megatron-mole factorize): this model has "
                          "no FactorLLM MoE layer")
    if options.trainable == "adapters+routers" and cfg is None:
        raise ConfigError("factorllm.trainable='adapters+routers' needs the MoLEConfig (rank, alpha) of the adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    install_context_hooks(model)
    handles = []
    for layer, moe in layers:
        for p in moe.router.parameters():
            p.requires_grad_(True)
        if options.trainable == "experts+routers":
            for p in moe.experts.parameters():
                p.requires_grad_(True)
        # the teacher first: from the experts' base weights, before any adapter
        handles.append(moe.register_forward_hook(_PAHook(moe, options, layer), with_kwargs=True))
        if options.trainable == "adapters+routers":
            _expert_adapters(moe, layer, cfg)
    return handles


@register_method
class FactorLLMMethod(Method):
    """``MoLEConfig(method="factorllm")``: ``apply_mole`` hands the model to :func:`apply_factorllm`
    (the loss weights and trainable set come from ``options``; expert adapters, with
    ``trainable: adapters+routers``, are LoRA of rank ``cfg.rank``)."""

    name = "factorllm"

    def kind_for(self, cfg, linear, in_dense_mlp):  # pragma: no cover - apply_model replaces the walk
        raise NotImplementedError("factorllm adapts whole MoE layers")

    def apply_model(self, model, cfg, options=None):
        apply_factorllm(model, options, cfg)
        return model
