"""Auxiliary router losses, the autograd trick that adds them to the training
loss, and a tracker that keeps per-layer values for logging.

The losses follow Megatron-core's MoE mechanism: instead of returning the aux
loss through the model's forward signature (impossible through Megatron's
TransformerBlock and pipeline schedules), :class:`AuxLossScaler` attaches it to
an activation. Its forward returns the activation unchanged; its backward
returns the activation's gradient untouched plus a gradient of ``scale`` for
the aux loss, so backprop from the main loss also differentiates the aux loss.
``scale`` must match the main loss's scaling: the training loop calls
``set_aux_loss_scale(1 / num_microbatches)`` (times any loss scale) exactly
as Megatron's schedules do for MoEAuxLossAutoScaler.

Legend: T tokens, E experts, K = top_k.
"""
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Optional

import torch

_RECOMPUTING = [0]


@contextmanager
def recomputing():
    """Marks the forward run inside it as an activation-recompute replay (Megatron's
    ``tensor_parallel.checkpoint`` re-running a layer in backward): statistics that
    accumulate per forward (the tracker below, global balance sums, load counters) were
    already taken by the first forward and must not count the replay again."""
    _RECOMPUTING[0] += 1
    try:
        yield
    finally:
        _RECOMPUTING[0] -= 1


def is_recomputing() -> bool:
    return _RECOMPUTING[0] > 0


def _valid(mask_T: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if mask_T is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask_T = mask_T.reshape(-1).to(device=device, dtype=torch.bool)
    if mask_T.numel() != n:
        raise ValueError(f"token mask has {mask_T.numel()} entries, expected one per token ({n})")
    return mask_T


def assignment_counts(expert_idx_TK: torch.Tensor, num_experts: int, mask_T: Optional[torch.Tensor] = None,
                      valid_TK: Optional[torch.Tensor] = None):
    """(assignments per expert [E], used assignments) of the valid tokens and used
    slots, without gradient and without a host sync."""
    num_tokens = expert_idx_TK.shape[0]
    weight_TK = _valid(mask_T, num_tokens, expert_idx_TK.device).float()[:, None].expand(expert_idx_TK.shape)
    if valid_TK is not None:
        weight_TK = weight_TK * valid_TK.float()
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=expert_idx_TK.device)
    counts_E.index_add_(0, expert_idx_TK.reshape(-1), weight_TK.reshape(-1))
    return counts_E, weight_TK.sum()


def load_balancing_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                        mask_T: Optional[torch.Tensor] = None,
                        valid_TK: Optional[torch.Tensor] = None,
                        f_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch/Mixtral balance loss N * sum_i f_i P_i.

    f_i: fraction of the used assignments that went to expert i (no gradient; given
    as ``f_E``, e.g. a global batch's, or counted here); P_i: mean router probability
    of expert i. Tokens with ``mask_T`` False (padding) are left out of both, unused
    slots (``valid_TK`` False) of f.
    """
    num_tokens, num_experts = probs_TE.shape
    weight_T = _valid(mask_T, num_tokens, probs_TE.device).to(probs_TE.dtype)
    if f_E is None:
        counts_E, used = assignment_counts(expert_idx_TK, num_experts, mask_T, valid_TK)
        f_E = counts_E / used.clamp(min=1.0)
    p_E = (probs_TE * weight_T[:, None]).sum(0) / weight_T.sum().clamp(min=1.0)
    return num_experts * (f_E.to(p_E.dtype) * p_E).sum()


def z_loss(logits_TE: torch.Tensor, mask_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (valid) tokens of logsumexp(logits)^2."""
    valid_T = _valid(mask_T, logits_TE.shape[0], logits_TE.device).to(logits_TE.dtype)
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    return (lse_T.square() * valid_T).sum() / valid_T.sum().clamp(min=1.0)


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``output``; gives ``aux_loss`` a gradient of ``scale``."""

    scale: Optional[torch.Tensor] = None

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        scale = AuxLossScaler.scale
        scale = 1.0 if scale is None else scale
        return grad_output, torch.ones_like(aux_loss) * scale


def set_aux_loss_scale(scale) -> None:
    """Scale applied to every aux loss's gradient (1 / num_microbatches in a
    Megatron schedule whose main loss is divided by the micro-batch count)."""
    AuxLossScaler.scale = scale


def attach_aux_loss(output: torch.Tensor, aux_loss: Optional[torch.Tensor]) -> torch.Tensor:
    if aux_loss is None or not torch.is_grad_enabled() or not aux_loss.requires_grad:
        return output
    return AuxLossScaler.apply(output, aux_loss)


class AuxLossTracker:
    """Running sums of per-layer router statistics (detached, no host sync).

    ``record`` is called by every MoLE layer on every forward; ``report``
    returns ``{layer_name: {stat: mean over the recorded calls}}`` (values are
    local to this rank: pipeline stages hold their own layers) and resets.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
        self._counts: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(self, layer: str, stats: Dict[str, torch.Tensor], replay: bool = False) -> None:
        """``replay=True``: the caller records in a recompute replay only (its first forward,
        without gradient, recorded nothing), so the replay's statistics count."""
        if is_recomputing() and not replay:  # the first forward of this layer recorded them
            return
        for key, value in stats.items():
            value = value.detach().float()
            prev = self._sums[layer].get(key)
            self._sums[layer][key] = value if prev is None else prev + value
            self._counts[layer][key] += 1

    def calls(self) -> Dict[str, Dict[str, int]]:
        """How many forwards recorded each statistic since the last reset."""
        return {layer: dict(counts) for layer, counts in self._counts.items()}

    def report(self, reset: bool = True) -> Dict[str, Dict[str, float]]:
        out = {layer: {key: float(total) / self._counts[layer][key] for key, total in stats.items()}
               for layer, stats in self._sums.items()}
        if reset:
            self.reset()
        return out


AUX_LOSS_TRACKER = AuxLossTracker()
