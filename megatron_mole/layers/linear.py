"""Adapters around one Megatron parallel linear: a plain LoRA and a MoLE mixture.

- :class:`LoRALinear`: y = W x + (alpha/r) B A dropout(x). Exported as
  ``{path}.lora.lora_a`` [R, I] and ``{path}.lora.lora_b`` [O, R].
- :class:`MoLELinear` (``expert_scope="linear"``, MoLA/DynMoLE): the linear's
  own router fed the linear's input,
  y = W x + sum_k p_k (alpha/r) B_k A_k dropout(x), with p the router's
  (un-renormalised) gates. Exported as ``{path}.mole.router.weight`` [E, I],
  ``{path}.mole.lora_a`` [E, R, I], ``{path}.mole.lora_b`` [E, O, R].

The wrapper keeps the base linear as child ``base`` and returns what the base
returns ((output, bias) for Megatron linears, a tensor for nn.Linear), so the
parent module calls it unchanged. TP/SP
plumbing comes from layers/parallel.py; dispatch from dispatch/; expert matmuls
from experts/. The gate multiplies the r-dim activation (B_k (p_k u) = p_k B_k u),
which is where TP needs it (see parallel.py).

Legend: T tokens, S sorted rows, E experts, R rank, I in (local), O out (local).
"""
import torch
import torch.nn.functional as F

from megatron_mole.experts import LoRA, LoRAExperts
from megatron_mole.layers.base import AdapterTensor, AdapterWrapper
from megatron_mole.layers.expert_parallel import build_expert_dispatcher, expert_sharding
from megatron_mole.layers.tp_split import TokenSplit, rows_to_shards, shards_to_rows
from megatron_mole.layers.parallel import placement_for
from megatron_mole.routing import AUX_LOSS_TRACKER, attach_aux_loss, build_router


def adapter_dropout(x, p: float, placement, training: bool):
    """Dropout on the adapter input. A TP-sharded input (row-parallel base) draws
    its mask from Megatron's model-parallel RNG stream; a replicated input from
    the default stream, identical on the TP ranks."""
    if p == 0 or not training:
        return x
    if placement.kind == "row" and placement.tp_size > 1:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        with get_cuda_rng_tracker().fork():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


def split_dims(placement, expert_dim: bool):
    """(split dim of A, split dim of B, split dim of the router) for a placement."""
    off = 1 if expert_dim else 0
    if placement.kind == "column":
        return None, off, None
    if placement.kind == "row":
        return off + 1, None, 1
    return None, None, None


class _LinearWrapper(AdapterWrapper):
    def __init__(self, base, cfg, placement=None):
        super().__init__()
        self.base = base
        self.cfg = cfg
        self.place = placement if placement is not None else placement_for(base)
        self.out_local, self.in_local = base.weight.shape
        self.dtype, self.device = base.weight.dtype, base.weight.device

    def forward(self, x, *args, **kwargs):
        res = self.base(x, *args, **kwargs)
        # Megatron linears return (output, bias); a plain nn.Linear a tensor.
        out, bias = res if isinstance(res, tuple) else (res, None)
        x_full = self.place.adapter_input(x)
        x_TI = x_full.reshape(-1, x_full.shape[-1])
        if self.place.output_is_local() and out.is_contiguous():
            # the adapter output lands on the base output's rows: scatter-add onto them
            y_TO, aux = self.delta(x_TI, into_TO=out.view(-1, out.shape[-1]))
            out = y_TO.view_as(out)
        else:
            y_TO, aux = self.delta(x_TI)
            y = self.place.adapter_output(y_TO.view(*x_full.shape[:-1], y_TO.shape[-1]))
            out = out + y.to(out.dtype)
        out = attach_aux_loss(out, aux)
        return (out, bias) if isinstance(res, tuple) else out


class LoRALinear(_LinearWrapper):
    def __init__(self, base, cfg, placement=None):
        super().__init__(base, cfg, placement)
        self.lora = LoRA(self.in_local, self.out_local, cfg.rank, self.dtype, self.device)

    def adapter_tensors(self):
        a_dim, b_dim, _ = split_dims(self.place, expert_dim=False)
        fan_in = self.in_local * (self.place.tp_size if a_dim is not None else 1)
        b_init = "kaiming" if self.cfg.lora_b_init == "random" else "zeros"
        return [AdapterTensor("lora.lora_a", self.lora.lora_a, self.place, a_dim, "kaiming", fan_in),
                AdapterTensor("lora.lora_b", self.lora.lora_b, self.place, b_dim, b_init,
                              self.cfg.rank)]

    def delta(self, x_TI, into_TO=None):
        x_TI = adapter_dropout(x_TI, self.cfg.dropout, self.place, self.training)
        u_TR = self.place.after_down(self.lora.down(x_TI)) * self.cfg.scaling
        y_TO = self.lora.up(u_TR)
        # out-of-place, as PEFT does: the benchmark's LoRA baseline
        return (y_TO if into_TO is None else into_TO + y_TO), None


class MoLELinear(_LinearWrapper):
    def __init__(self, base, cfg, placement=None):
        super().__init__(base, cfg, placement)
        self.router = build_router(self.in_local, cfg, device=self.device)
        tp, kind = self.place.tp_size, self.place.kind
        full_dims = (self.in_local * (tp if kind == "row" else 1),
                     self.out_local * (tp if kind == "column" else 1))
        self.sharding = expert_sharding(cfg, [full_dims])
        self.mole = LoRAExperts(self.sharding.num_local(cfg.num_experts), self.in_local,
                                self.out_local, cfg.rank, cfg.grouped_mm_backend, self.dtype,
                                self.device)
        self.dispatcher = build_expert_dispatcher(cfg, self.sharding)

    def adapter_tensors(self):
        a_dim, b_dim, r_dim = split_dims(self.place, expert_dim=True)
        fan_in = self.in_local * (self.place.tp_size if a_dim is not None else 1)
        b_init = "kaiming" if self.cfg.lora_b_init == "random" else "zeros"
        return [
            AdapterTensor("mole.router.weight", self.router.weight, self.place, r_dim, "kaiming",
                          fan_in),
            AdapterTensor("mole.lora_a", self.mole.lora_a, self.place, a_dim, "kaiming", fan_in,
                          self.sharding),
            AdapterTensor("mole.lora_b", self.mole.lora_b, self.place, b_dim, b_init,
                          self.cfg.rank, self.sharding),
        ]

    def delta(self, x_TI, into_TO=None):
        routing = self.router(x_TI, reduce_logits=self.place.reduce_logits())
        AUX_LOSS_TRACKER.record(self.adapter_prefix, routing.stats)
        return mole_linear_delta(x_TI, routing, self.mole, self.dispatcher, self.place,
                                 self.cfg, self.training, into_TO), routing.aux_loss


def mole_linear_delta(x_TI, routing, experts, dispatcher, place, cfg, training, into_TO=None):
    """sum_k p_k (alpha/r) B_k A_k dropout(x) for every token (fast path),
    added to ``into_TO`` by one scatter-add when given and the dispatcher can.

    Expert parallelism under a column-parallel base: the TP ranks hold the same
    tokens, so each dispatches one chunk (layers/tp_split.py); the expert's TP
    peers gather the rows, and one TP all-to-all on each side turns their
    out-shards back into this rank's shard of every token."""
    x_TI = adapter_dropout(x_TI, cfg.dropout, place, training)
    idx_TK, gates_TK = routing.expert_idx_TK, routing.gates_TK
    split = None
    if place.kind == "column" and place.tp_size > 1 and getattr(dispatcher, "ep_size", 1) > 1:
        split = TokenSplit(place.group)
        num_tokens = x_TI.shape[0]
        _, start, stop = split.bounds(num_tokens)
        x_TI, gates_TK, idx_TK = split.take_chunk(x_TI), split.take_chunk(gates_TK), idx_TK[start:stop]
    x_SI, gates_S, plan = dispatcher.permute(x_TI, idx_TK, gates_TK)
    counts = plan.counts_G
    if split is not None:
        (x_SI, gates_S), counts, undo = split.gather_rows(counts, x_SI, gates_S)
    u_SR = experts.down(x_SI, counts)
    u_SR = place.gate_and_reduce(u_SR, gates_S * cfg.scaling)
    y_SO = experts.up(u_SR, counts)
    if split is not None:
        y_TO = rows_to_shards(dispatcher.combine(shards_to_rows(y_SO, undo, split), plan), num_tokens, split)
        return y_TO if into_TO is None else into_TO + y_TO.to(into_TO.dtype)
    if into_TO is None:
        return dispatcher.combine(y_SO, plan)
    if hasattr(dispatcher, "combine_add"):
        return dispatcher.combine_add(into_TO, y_SO, plan)
    return into_TO + dispatcher.combine(y_SO, plan)
