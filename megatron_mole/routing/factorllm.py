"""FactorLLM's routing math (DESIGN §6), plain PyTorch: used by the Megatron layer
(layers/factorllm.py) and the Hugging Face module (hf/factorllm.py) alike.

A dense SwiGLU FFN of F intermediate neurons is split into N experts of F/N neurons;
a router Linear(D, N) *with bias* scores each token; the output is
``y = (N/K) * sum_{i in topK} E_i(x)``: the chosen experts are summed with the
constant weight N/K, not with their probabilities, so the language-model loss gives
the router no gradient. The router learns from the Prior-Approximate (PA) loss and the
balance loss only:

- per token and expert, the error of the expert against the frozen dense FFN T on the
  *same* input x (the layer's own MLP input): ``l_i = mean_d (E_i(x) - T(x) / (N/K))^2``;
- the prior ``q = softmax(onehot_topK(-l))`` (1 on the K experts of smallest error, 0
  elsewhere, then a softmax: ``e / (K e + N - K)`` on them, ``1 / (K e + N - K)`` on the rest);
- ``L_PA = KL(p || q) = sum_i p_i (log p_i - log q_i)`` per token with
  ``p = softmax(W x + b)`` in fp32, averaged over the (non-padding) tokens of the
  micro-batch, so its value and gradient do not depend on the micro-batch size (the
  public code's KL was right only at batch size 1). ``q`` carries no gradient.

Selection is ``topk`` of the logits (softmax is monotone, so these are the top-K
probabilities; taking them from the logits keeps Megatron and transformers identical).
Ties break towards the lower expert id on both sides (``torch.topk``).

Legend: T tokens, D hidden, N experts, K chosen per token.
"""
from typing import Optional

import torch

from megatron_mole.routing.losses import _valid


def router_logits(x_TD: torch.Tensor, weight_ND: torch.Tensor, bias_N: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` in fp32 (selection must not flip with the compute precision), or in
    fp64 for a float64 input (``verify --dtype float64``)."""
    dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    return torch.nn.functional.linear(x_TD.to(dtype), weight_ND.to(dtype), bias_N.to(dtype))


def select(logits_TN: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [T, K] of the chosen experts."""
    return torch.topk(logits_TN, top_k, dim=-1).indices


def output_scale(num_experts: int, top_k: int) -> float:
    """The constant weight N/K of every chosen expert."""
    return num_experts / top_k


def expert_errors(outputs_TND: torch.Tensor, teacher_TD: torch.Tensor, scale: float) -> torch.Tensor:
    """``l_i = mean_d (E_i(x) - T(x)/scale)^2`` [T, N], fp32, no gradient."""
    with torch.no_grad():
        diff = outputs_TND.float() - (teacher_TD.float() / scale)[:, None, :]
        return diff.square().mean(-1)


def prior(errors_TN: torch.Tensor, top_k: int) -> torch.Tensor:
    """``q = softmax(onehot_topK(-l))`` [T, N] (no gradient)."""
    with torch.no_grad():
        best_TK = torch.topk(-errors_TN.float(), top_k, dim=-1).indices
        onehot = torch.zeros_like(errors_TN, dtype=torch.float32).scatter_(1, best_TK, 1.0)
        return torch.softmax(onehot, dim=-1)


def pa_loss(logits_TN: torch.Tensor, errors_TN: torch.Tensor, top_k: int,
            mask_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over valid tokens of ``KL(p || q)`` (gradient to the logits only)."""
    logp_TN = torch.log_softmax(logits_TN.float(), dim=-1)
    logq_TN = torch.log(prior(errors_TN, top_k))
    kl_T = (logp_TN.exp() * (logp_TN - logq_TN)).sum(-1)
    valid_T = _valid(mask_T, kl_T.shape[0], kl_T.device).to(kl_T.dtype)
    return (kl_T * valid_T).sum() / valid_T.sum().clamp(min=1.0)
