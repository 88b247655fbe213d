"""Parrot's text-guided MoE (experts/parrot.py) against a hand-written per-sample, per-expert loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_mole.experts.parrot import ParrotMoE, parrot_parameter_count


def _reference(moe, visual_BVD, text_BLD, mask_BL):
    """DESIGN §6 written out one sample and one expert at a time."""
    outs = []
    for b in range(visual_BVD.shape[0]):
        H, T = visual_BVD[b], text_BLD[b][mask_BL[b]]
        if T.shape[0]:
            a = torch.softmax(H[0] @ T.t() / math.sqrt(H.shape[-1]), dim=-1)
            g = a @ T
        else:
            g = torch.zeros_like(H[0])
        w = torch.softmax(g @ moe.router.weight.t(), dim=-1)
        out = moe.alpha * H
        for i in range(moe.num_experts):
            if moe.lora_rank is None:
                Wg, Wu, Wd = moe.gate_EFD[i], moe.up_EFD[i], moe.down_EDF[i]
            else:
                s = moe.lora_scale
                Wg = moe.gate_FD + s * moe.gate_b[i] @ moe.gate_a[i]
                Wu = moe.up_FD + s * moe.up_b[i] @ moe.up_a[i]
                Wd = moe.down_DF + s * moe.down_b[i] @ moe.down_a[i]
            out = out + w[i] * ((F.silu(H @ Wg.t()) * (H @ Wu.t())) @ Wd.t())
        outs.append(out)
    return torch.stack(outs)


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_parrot_matches_reference_forward_and_backward(lora_rank):
    torch.manual_seed(0)
    moe = ParrotMoE(hidden=16, ffn=24, num_experts=3, alpha=0.1, lora_rank=lora_rank, seed=3, dtype=torch.float64)
    if lora_rank is not None:  # B starts at zero: move it so the LoRA path counts
        with torch.no_grad():
            for n in ("gate_b", "up_b", "down_b"):
                getattr(moe, n).normal_(0, 0.1)
    visual = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    text = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0] * 7], dtype=torch.bool)
    ours = moe(visual, text, mask)
    grads = torch.autograd.grad(ours.square().sum(), [visual] + list(moe.parameters()))
    ref = _reference(moe, visual, text, mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), [visual] + list(moe.parameters()))
    assert (ours - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max())
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-6 * max(1.0, r.abs().max())
    # the text steers the routing: other prompts, other weights
    w1 = moe.routing_weights(visual, text, mask)
    w2 = moe.routing_weights(visual, -text, mask)
    assert (w1[:2] - w2[:2]).abs().max() > 1e-4
    assert torch.allclose(w1[2], torch.full((3,), 1 / 3, dtype=torch.float64))  # no prompt tokens: uniform


def test_parrot_parameter_counts_and_errors():
    full = ParrotMoE(16, 24, 3)
    lora = ParrotMoE(16, 24, 3, lora_rank=4)
    assert sum(p.numel() for p in full.parameters()) == parrot_parameter_count(16, 24, 3) == 3 * 3 * 16 * 24 + 48
    assert sum(p.numel() for p in lora.parameters()) == parrot_parameter_count(16, 24, 3, 4)
    with pytest.raises(ValueError, match="prompt_mask"):
        full(torch.randn(2, 4, 16), torch.randn(2, 5, 16), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="lora_rank"):
        ParrotMoE(16, 24, 3, lora_rank=0)
