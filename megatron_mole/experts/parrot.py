"""Parrot's text-guided mixture of experts over visual tokens (plain PyTorch).

Per sample (DESIGN §6, AIDC-AI/Parrot ``moe.py``), with H_v [V, D] the visual tokens after
the projector and T [L, D] the raw text embeddings of the prompt tokens:

    a   = softmax(H_v[0] T^T / sqrt(D))            the CLS visual token attends to the text,
    g   = a T                                       no projections
    w   = softmax(W_r g)                           [E], one weight vector per sample
    H_v' = sum_i w_i E_i(H_v) + alpha H_v           dense soft mixture, no auxiliary loss

Each expert E_i is a SwiGLU MLP D -> F -> D: ``down(silu(gate x) * up x)``, bias-free.
``lora_rank=r`` makes the experts LoRA experts instead: one shared SwiGLU (W_gate, W_up,
W_down) and per expert a rank-r update of each of its three matrices,
E_i(x) = down_i(silu(gate_i x) * up_i x) with W_*,i = W_* + (alpha_lora / r) B_*,i A_*,i.
Parameter counts (the router's E*D included):

    full experts : E * 3DF + ED
    LoRA experts : 3DF + 3 E r (D + F) + ED     (gate and up: r(D+F) each, down: r(F+D))

(:func:`parrot_parameter_count` computes both.) The shared MLP is trained like the full
experts; B starts at zero, so at initialisation every LoRA expert equals the shared one.

Which vision token is "CLS": the first of H_v. With LLaVA's default feature selection the
CLS token is dropped before the projector; Parrot's code then uses the first patch token,
and so do we (the module sees only H_v).

Text tokens are given padded, [B, L, D], with ``prompt_mask_BL`` (True = a prompt token).
A sample without prompt tokens gets g = 0 (uniform attention over nothing is undefined);
its router then sees only its bias-free zero input, i.e. w = uniform.

Legend: B batch (= images: one image per sample), V visual tokens, L text tokens,
D hidden, F expert hidden, E experts, r LoRA rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ParrotMoE", "parrot_parameter_count"]


def parrot_parameter_count(hidden: int, ffn: int, num_experts: int, lora_rank: Optional[int] = None) -> int:
    router = num_experts * hidden
    if lora_rank is None:
        return num_experts * 3 * hidden * ffn + router
    return 3 * hidden * ffn + 3 * num_experts * lora_rank * (hidden + ffn) + router


class ParrotMoE(nn.Module):
    """Text-guided soft mixture of SwiGLU experts over visual tokens (see the module docstring).

    Tensors: ``router.weight`` [E, D]; full experts ``gate_EFD``, ``up_EFD``, ``down_EDF``;
    LoRA experts ``gate_FD``, ``up_FD``, ``down_DF`` (shared) and ``{gate,up,down}_a`` [E, r, in],
    ``{gate,up,down}_b`` [E, out, r].
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int = 6, alpha: float = 0.1,
                 lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None, seed: int = 0,
                 dtype=torch.float32, device=None):
        super().__init__()
        if num_experts < 1 or hidden < 1 or ffn < 1:
            raise ValueError(f"ParrotMoE: hidden, ffn and num_experts must be >= 1; got {hidden}, {ffn}, "
                             f"{num_experts}")
        if lora_rank is not None and lora_rank < 1:
            raise ValueError(f"ParrotMoE: lora_rank must be >= 1 or None; got {lora_rank}")
        self.hidden, self.ffn, self.num_experts, self.alpha = hidden, ffn, num_experts, float(alpha)
        self.lora_rank = lora_rank
        self.lora_scale = None if lora_rank is None else float(lora_alpha or 2 * lora_rank) / lora_rank
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape, fan_in):
            # The full tensor from one seeded generator: the same at any parallel layout.
            return nn.Parameter((torch.randn(*shape, generator=gen) / math.sqrt(fan_in)).to(dtype=dtype,
                                                                                         device=device))

        E, D, Fh = num_experts, hidden, ffn
        self.router = nn.Linear(D, E, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            self.router.weight.copy_(torch.randn(E, D, generator=gen) * 0.02)
        if lora_rank is None:
            self.gate_EFD, self.up_EFD = draw(E, Fh, D, fan_in=D), draw(E, Fh, D, fan_in=D)
            self.down_EDF = draw(E, D, Fh, fan_in=Fh)
        else:
            r = lora_rank
            self.gate_FD, self.up_FD, self.down_DF = draw(Fh, D, fan_in=D), draw(Fh, D, fan_in=D), draw(D, Fh, fan_in=Fh)
            for name, (out_dim, in_dim) in (("gate", (Fh, D)), ("up", (Fh, D)), ("down", (D, Fh))):
                setattr(self, f"{name}_a", draw(E, r, in_dim, fan_in=in_dim))
                setattr(self, f"{name}_b", nn.Parameter(torch.zeros(E, out_dim, r, dtype=dtype, device=device)))

    def expert_weights(self):
        """(gate [E, F, D], up [E, F, D], down [E, D, F]) of every expert."""
        if self.lora_rank is None:
            return self.gate_EFD, self.up_EFD, self.down_EDF
        s = self.lora_scale
        return tuple(base.unsqueeze(0) + s * torch.bmm(getattr(self, f"{n}_b"), getattr(self, f"{n}_a"))
                     for n, base in (("gate", self.gate_FD), ("up", self.up_FD), ("down", self.down_DF)))

    def routing_weights(self, visual_BVD: torch.Tensor, text_BLD: torch.Tensor,
                        prompt_mask_BL: torch.Tensor) -> torch.Tensor:
        """w [B, E]: the CLS visual token's attention over the prompt embeddings, routed."""
        if text_BLD.shape[0] != visual_BVD.shape[0] or text_BLD.shape[-1] != visual_BVD.shape[-1]:
            raise ValueError(f"ParrotMoE: text embeddings {tuple(text_BLD.shape)} do not fit visual tokens "
                             f"{tuple(visual_BVD.shape)} (one image per sample, same hidden size)")
        if prompt_mask_BL.shape != text_BLD.shape[:2]:
            raise ValueError(f"ParrotMoE: prompt_mask {tuple(prompt_mask_BL.shape)} does not match the text "
                             f"embeddings {tuple(text_BLD.shape[:2])}")
        mask = prompt_mask_BL.bool()
        scores_BL = torch.einsum("bd,bld->bl", visual_BVD[:, 0], text_BLD) / math.sqrt(self.hidden)
        # routing in at least fp32 (bf16 softmax over the prompt would be coarse)
        wide = torch.promote_types(visual_BVD.dtype, torch.float32)
        scores_BL = scores_BL.to(wide).masked_fill(~mask, float("-inf"))
        attn_BL = torch.softmax(scores_BL, dim=-1)
        attn_BL = torch.where(mask.any(-1, keepdim=True), attn_BL, torch.zeros_like(attn_BL))
        guide_BD = torch.einsum("bl,bld->bd", attn_BL.to(text_BLD.dtype), text_BLD)
        return torch.softmax(self.router(guide_BD).to(wide), dim=-1)

    def forward(self, visual_BVD: torch.Tensor, text_BLD: torch.Tensor, prompt_mask_BL: torch.Tensor) -> torch.Tensor:
        w_BE = self.routing_weights(visual_BVD, text_BLD, prompt_mask_BL).to(visual_BVD.dtype)
        gate_EFD, up_EFD, down_EDF = self.expert_weights()
        h_BEVF = F.silu(torch.einsum("bvd,efd->bevf", visual_BVD, gate_EFD)) * \
            torch.einsum("bvd,efd->bevf", visual_BVD, up_EFD)
        # sum_i w_i E_i(x): weight the experts' hidden activations, then one down projection per expert
        out_BVD = torch.einsum("bevf,edf,be->bvd", h_BEVF, down_EDF, w_BE)
        return out_BVD + self.alpha * visual_BVD

    def extra_repr(self) -> str:
        kind = "full experts" if self.lora_rank is None else f"LoRA experts r={self.lora_rank}"
        return f"hidden={self.hidden}, ffn={self.ffn}, experts={self.num_experts}, alpha={self.alpha}, {kind}"
