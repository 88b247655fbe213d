"""Routing statistics per domain: pure functions of routing decisions (no model, no Megatron).

``routing_sums`` turns one router call's decisions into additive sums (so several batches,
data-parallel ranks and tensor-parallel sequence chunks combine by adding them);
``summarize`` turns a layer's sums into the reported statistics; ``select_experts`` is Router
Lens's ranking.

Definitions (D domains, E experts; a *use* is one (token, expert) pair the router chose,
i.e. one valid top-k slot):

- ``load[d][e]``: the fraction of domain d's uses that went to expert e (rows sum to 1);
  ``load_all[e]`` the same over every domain.
- ``entropy[d]``: mean over d's tokens of the routing entropy -sum_e p_e log p_e (nats) of
  the router's full distribution p; ``max_entropy`` = log E.
- ``experts_per_token[d]``: mean number of experts a token of d used (top-k: k; DynMoLE and
  GW-MoE: variable).
- ``mutual_information``: I(domain; expert) in nats of the joint distribution of uses,
  P(d, e) = uses(d, e) / all uses. 0 when every domain spreads over the experts alike;
  its maximum is min(H(domain), H(expert)). ``specialisation`` = I / H(domain) (0..1;
  1: the expert a token uses determines its domain, e.g. each domain on its own expert at
  top-1). Domains weigh by their number of uses, so a mixture's proportions matter.

Legend: T tokens, K slots per token, E experts, D domains.
"""
import math

import torch

SUM_KEYS = ("uses_DE", "tokens_D", "entropy_D", "experts_D")


def routing_sums(expert_idx_TK: torch.Tensor, domain_T: torch.Tensor, num_domains: int, num_experts: int,
                 probs_TE: torch.Tensor | None = None, valid_TK: torch.Tensor | None = None) -> dict:
    """Additive float64 sums (CPU) of one router call. Tokens with ``domain_T < 0`` (padding,
    tokens outside the analysed set) are left out; ``valid_TK`` False slots are unused."""
    if expert_idx_TK.dim() != 2 or domain_T.shape != expert_idx_TK.shape[:1]:
        raise ValueError(f"routing_sums: expert_idx_TK {tuple(expert_idx_TK.shape)} and domain_T "
                         f"{tuple(domain_T.shape)} must be [T, K] and [T]")
    expert_idx_TK, domain_T = expert_idx_TK.detach().cpu().long(), domain_T.detach().cpu().long()
    keep_T = domain_T >= 0
    valid_TK = (torch.ones_like(expert_idx_TK, dtype=torch.bool) if valid_TK is None
                else valid_TK.detach().cpu().bool())
    use_TK = valid_TK & keep_T[:, None]
    used = expert_idx_TK[use_TK]
    if used.numel() and (int(used.max()) >= num_experts or int(used.min()) < 0):
        raise ValueError(f"routing_sums: expert ids outside [0, {num_experts})")
    if domain_T.numel() and int(domain_T.max()) >= num_domains:
        raise ValueError(f"routing_sums: domain ids outside [0, {num_domains})")
    d_TK = domain_T[:, None].expand_as(expert_idx_TK)
    uses_DE = torch.zeros(num_domains * num_experts, dtype=torch.float64)
    uses_DE.index_add_(0, (d_TK * num_experts + expert_idx_TK)[use_TK],
                       torch.ones(int(use_TK.sum()), dtype=torch.float64))
    kept = domain_T[keep_T]
    tokens_D = torch.bincount(kept, minlength=num_domains).double()
    experts_D = torch.zeros(num_domains, dtype=torch.float64).index_add_(0, kept, valid_TK[keep_T].sum(-1).double())
    entropy_D = torch.zeros(num_domains, dtype=torch.float64)
    if probs_TE is not None:
        p = probs_TE.detach().cpu().double()[keep_T]
        entropy_D.index_add_(0, kept, -(p * p.clamp(min=1e-300).log()).sum(-1))
    return {"uses_DE": uses_DE.view(num_domains, num_experts), "tokens_D": tokens_D, "entropy_D": entropy_D,
            "experts_D": experts_D}


def add_sums(total: dict | None, sums: dict) -> dict:
    """``total`` + ``sums`` (a new dict; ``total`` None: a copy of ``sums``)."""
    if total is None:
        return {k: sums[k].clone() for k in SUM_KEYS}
    return {k: total[k] + sums[k] for k in SUM_KEYS}


def _entropy(p) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def mutual_information(uses_DE: torch.Tensor) -> tuple:
    """(I(domain; expert), H(domain)) in nats of the joint distribution of uses."""
    total = float(uses_DE.sum())
    if total == 0:
        return 0.0, 0.0
    joint = (uses_DE.double() / total).tolist()
    p_d = [sum(row) for row in joint]
    p_e = [sum(col) for col in zip(*joint)]
    mi = sum(p * math.log(p / (p_d[d] * p_e[e])) for d, row in enumerate(joint) for e, p in enumerate(row) if p > 0)
    return max(mi, 0.0), _entropy(p_d)


def summarize(sums: dict, domains, has_probs: bool = True) -> dict:
    """The reported statistics of one router from its sums (see the module docstring).
    Domains without tokens are left out of the per-domain entries."""
    uses_DE, tokens_D = sums["uses_DE"], sums["tokens_D"]
    num_experts = uses_DE.shape[1]
    present = [i for i, _ in enumerate(domains) if tokens_D[i] > 0]

    def fractions(row):
        s = float(row.sum())
        return [float(v) / s if s else 0.0 for v in row]

    mi, h_domain = mutual_information(uses_DE[present])
    all_tokens = float(tokens_D.sum())
    out = {
        "tokens": {domains[i]: int(tokens_D[i]) for i in present},
        "uses": {domains[i]: [int(v) for v in uses_DE[i]] for i in present},
        "load": {domains[i]: fractions(uses_DE[i]) for i in present},
        "load_all": fractions(uses_DE.sum(0)),
        "experts_per_token": {domains[i]: float(sums["experts_D"][i] / tokens_D[i]) for i in present},
        "mutual_information": mi,
        "specialisation": mi / h_domain if h_domain > 0 else 0.0,
        "max_entropy": math.log(num_experts),
    }
    if all_tokens:
        out["experts_per_token"]["all"] = float(sums["experts_D"].sum()) / all_tokens
    if has_probs:
        out["entropy"] = {domains[i]: float(sums["entropy_D"][i] / tokens_D[i]) for i in present}
        if all_tokens:
            out["entropy"]["all"] = float(sums["entropy_D"].sum()) / all_tokens
    return out


def select_experts(uses_E, n: int) -> list:
    """Router Lens: the ``n`` experts used most often (count of tokens having the expert among
    their chosen top-k), most used first; ties go to the lower expert id."""
    uses = [float(v) for v in uses_E]
    if not 1 <= n <= len(uses):
        raise ValueError(f"--select {n}: must be in [1, {len(uses)}] (the router's experts)")
    return sorted(range(len(uses)), key=lambda e: (-uses[e], e))[:n]
