"""LoRA weights: one adapter (:class:`LoRA`) and E experts (:class:`LoRAExperts`).

Shapes follow nn.Linear: A maps in -> r, B maps r -> out. Expert tensors put
the expert dimension first (``lora_a_ERI``, ``lora_b_EOR``) so expert
parallelism shards dim 0 with global id = local id + ep_rank * E_local. These
modules hold weights and do the two matmuls; ``block`` is the one expert block
every wrapper runs: dropout -> down -> gate, scale and complete over TP -> up,
with the TP plumbing (dropout RNG, the r-dim reduction) supplied by the caller's
placement object (layers/parallel.py); routing and communication are the
caller's (layers/, dispatch/).

Legend: S sorted rows, T tokens, E experts, G groups (= E * number of top-k
slots when rows are slot-major), R rank, I in features, O out features.
"""
from typing import Sequence

import torch
from torch import nn

from megatron_mole.experts.grouped import grouped_linear


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, dtype=None, device=None):
        super().__init__()
        self.lora_a = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    def down(self, x_TI: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x_TI, self.lora_a)

    def up(self, u_TR: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(u_TR, self.lora_b)


class LoRAExperts(nn.Module):
    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int,
                 backend: str = "loop", dtype=None, device=None):
        super().__init__()
        self.num_experts = num_experts
        self.backend = backend
        self.lora_a = nn.Parameter(torch.zeros(num_experts, rank, in_features, dtype=dtype,
                                               device=device))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, out_features, rank, dtype=dtype,
                                               device=device))

    def _check_groups(self, counts_G: Sequence[int]) -> None:
        if len(counts_G) % self.num_experts:
            raise ValueError(f"LoRAExperts: {len(counts_G)} groups is not a multiple of "
                             f"num_experts={self.num_experts}")

    def down(self, x_SI: torch.Tensor, counts_G: Sequence[int]) -> torch.Tensor:
        # slot-major rows (dispatch/local.py): group g uses expert g % E
        self._check_groups(counts_G)
        return grouped_linear(x_SI, self.lora_a, counts_G, self.backend)

    def up(self, u_SR: torch.Tensor, counts_G: Sequence[int]) -> torch.Tensor:
        self._check_groups(counts_G)
        return grouped_linear(u_SR, self.lora_b, counts_G, self.backend)

    def block(self, x_SI: torch.Tensor, gates_S: torch.Tensor, counts_G: Sequence[int], placement,
              dropout: float, training: bool) -> torch.Tensor:
        """sum-ready expert rows ``B_g (gates_S * A_g dropout(x))`` of each segment g;
        ``gates_S`` already include the LoRA scaling."""
        x_SI = placement.dropout(x_SI, dropout, training)
        u_SR = placement.gate_and_reduce(self.down(x_SI, counts_G), gates_S)
        return self.up(u_SR, counts_G)
