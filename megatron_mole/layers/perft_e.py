"""PERFT-E: one PEFT expert per base expert, dispatched and weighted by the frozen base router.

Expert e's output becomes E_e(x) + P_e(x) with P_e(x) = s B_e A_e x (D -> r -> D), so
the block computes y = sum_{e in topk} g_e (E_e(x) + P_e(x)) with the base router's
gates g (layers/perft.py has the family). The adapter hooks the base block's
``experts`` module (a forward hook, so Megatron's own router and token dispatcher do
everything else): that module receives the rows its rank's experts got, sorted by
local expert, the rows per expert (``tokens_per_expert``) and each row's gate. The
hook runs one grouped LoRA over those segments (experts/grouped.py, the same seam as
every MoLE expert) and adds ``gate * P_e(row)`` to the experts' output. This is the
same contract for Megatron's SequentialMLP, GroupedMLP and TEGroupedMLP (one forward
signature: rows, tokens_per_expert, probs), so the design holds for the grouped GPU
experts unchanged; whether the experts apply the gates inside (after the activation)
or on their input (``moe_apply_probs_on_input``), the hook sees the original rows and
gates and P is linear, so gate * P_e(row) is the right term either way. The grouped
matmul takes the segment sizes as host ints: one ``tokens_per_expert.tolist()`` per block
(SequentialMLP makes the same one; under GroupedMLP it is the adapter's only host sync).

Placement follows the base expert: expert e's adapter lives on the expert-parallel
rank that holds e (dim 0 split like Megatron's ``local_expert_indices``) and its
parameters carry ``allreduce=False`` (reduced over the expert-data-parallel group, as
the experts' own). Under expert tensor parallelism (etp > 1) the expert's fc2 output
is a partial sum that the dispatcher reduces; the adapter splits its rank dim r over
the expert-TP group (A's rows, B's columns: a column- then row-parallel pair) so its
output is a partial sum too, and its rows (replicated over expert TP, like the
expert input) need no extra communication. r must divide by etp. Dropout under
etp > 1 would need one mask per expert-TP group: refused.

On the Hugging Face side (transformers 5.x fused ``*Experts`` modules, forward
``(hidden_states, top_k_index, top_k_weights)``) the hook takes the router's top-k
ids and weights instead and dispatches locally (dispatch/local.py).

Tensors ``{moe}.perft.lora_a`` [E, R, H], ``{moe}.perft.lora_b`` [E, H, R], E = the
base's expert count (``MoLEConfig.num_experts``/``top_k``/``router`` do not apply).

Legend: S rows at this rank's experts, T tokens, K base top-k, E base experts, R rank, H hidden.
"""
import torch

from megatron_mole.dispatch.local import LocalDispatcher
from megatron_mole.dispatch.sharding import REPLICATED, ExpertSharding
from megatron_mole.errors import ConfigError
from megatron_mole.experts import LoRAExperts
from megatron_mole.layers.base import AdapterWrapper
from megatron_mole.layers.parallel import NoParallel, TPPlacement
from megatron_mole.layers.perft import PREFIX, MoEBlockKind, MoEDims, _ab, disable_base_aux_losses
from megatron_mole.layers.specs import register_adapter_kind

_A, _B = "lora_a", "lora_b"  # placements: A's R rows column-split, B's R columns row-split


class ExpertTPSplit(TPPlacement):
    """The expert-tensor-parallel split of the adapter's rank dim (shard/unshard only)."""

    def __init__(self, kind: str, group):
        self.kind, self.group, self.stride, self.sequence_parallel = kind, group, 1, False
        self.tp_size, self.tp_rank = group.size(), group.rank()


def num_base_experts(config) -> int:
    """Routed experts per block, from a Megatron or transformers config."""
    n = getattr(config, "num_moe_experts", None) or getattr(config, "num_local_experts", None) \
        or getattr(config, "num_experts", None)
    if not n:
        raise ConfigError(f"method 'perft-e': cannot read the base's expert count from {type(config).__name__}")
    return int(n)


class PerftE(AdapterWrapper):
    kind = "perft_e"
    layer_number = None
    param_rewrites = {f"{PREFIX}.": "adapters."}

    def __init__(self, base, cfg, base_config=None):
        super().__init__()
        self.base, self.cfg = base, cfg
        config = base_config if base_config is not None else base.config
        disable_base_aux_losses(base)
        self.hidden, self.num_experts = int(config.hidden_size), num_base_experts(config)
        experts = base.experts
        ep_group, etp_group = getattr(base, "ep_group", None), getattr(experts, "tp_group", None)
        self.place_a, self.place_b = NoParallel(), NoParallel()
        if etp_group is not None and etp_group.size() > 1:
            if cfg.rank % etp_group.size():
                raise ConfigError(f"MoLEConfig.rank={cfg.rank}: method 'perft-e' splits the rank over the "
                                  f"expert-tensor-parallel size {etp_group.size()}; it must divide")
            if cfg.dropout:
                raise ConfigError(f"MoLEConfig.dropout={cfg.dropout}: method 'perft-e' does not support dropout "
                                  f"under expert tensor parallelism")
            self.place_a, self.place_b = ExpertTPSplit("column", etp_group), ExpertTPSplit("row", etp_group)
        self.sharding = REPLICATED
        if ep_group is not None and ep_group.size() > 1:
            self.sharding = ExpertSharding(ep_group.size(), ep_group.rank(), ep_group)
        ref = next(p for p in base.parameters())
        self.adapters = LoRAExperts(self.sharding.num_local(self.num_experts), self.hidden, self.hidden,
                                    cfg.rank // self.place_a.tp_size, cfg.grouped_mm_backend, ref.dtype, ref.device)
        for p in self.adapters.parameters():
            p.allreduce = False  # with the base experts: reduced over the expert-data-parallel group
        self._hook = experts.register_forward_hook(self._add_adapters)

    def unit_dims(self) -> MoEDims:
        return MoEDims.block(self.hidden, self.num_experts)

    def placement_of(self, linear):
        return self.place_a if linear == _A else self.place_b

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def _add_adapters(self, module, args, output):
        out, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        x, second, third = args[:3]
        if second.dim() == 2:  # transformers: (hidden [T, H], top_k_index [T, K], top_k_weights [T, K])
            y = self._local(x, second, third)
        else:  # Megatron: (rows [S, H] by local expert, tokens_per_expert [E_local], probs [S])
            counts = second.tolist() if torch.is_tensor(second) else list(second)
            y = self.adapters.block(x, third.float() * self.cfg.scaling, counts, NoParallel(), self.cfg.dropout,
                                    self.training)
        out = out + y.to(out.dtype)
        return (out, *rest) if rest is not None else out

    def _local(self, x_TH, idx_TK, w_TK):
        x_SH, gates_S, plan = LocalDispatcher(self.num_experts).permute(x_TH, idx_TK, w_TK.float())
        y_SH = self.adapters.block(x_SH, gates_S * self.cfg.scaling, plan.counts_G, NoParallel(), self.cfg.dropout,
                                   self.training)
        return LocalDispatcher(self.num_experts).combine(y_SH, plan)


@register_adapter_kind
class PerftEKind(MoEBlockKind):
    name, wrapper = "perft_e", PerftE

    def tensors(self, cfg, dims):
        num = getattr(dims, "num_base_experts", 1)
        return _ab(cfg, dims.of(None)[0], lead=(num,), experts=True, linears=(_A, _B))
