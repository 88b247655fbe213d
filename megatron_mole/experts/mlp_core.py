"""Fused core of the MLP-scope mixture for SwiGLU: memory traffic, not FLOPs.

On CPUs (DESIGN §4) the cost of an adapted MLP beyond its matmuls is the
number of large [rows, F] tensors written: each fresh one costs page faults
plus a full pass. Autograd's composition of gather, cat, add, silu, mul and the
weighted fold allocates ~9 such tensors forward and more backward. This
autograd Function does the same math with in-place updates of buffers it owns:

forward (S = K*T expert-sorted rows, block 0 = every token once):
    z_S   = delta_S (+)= base1 rows       in place in delta (fc1's LoRA output)
    h_S   = silu(gate(z)) * up(z)         one [S, F] tensor
    hbar  = sum_k g_k h_k on block 0      one [T, F] tensor (K > 1 only)
backward: the gradient of z is written into z's own storage and returned for
both delta and (block 0 / gathered) base1; h's storage holds silu(gate) and
the fold's gradient is accumulated into the incoming gradient of h.

Shapes/semantics match layers/mole_mlp.py's generic path, which remains the
reference for other activations (and is checked against the same per-token
loop in tests/test_layers.py). Blocks after the first may hold fewer than T
rows (a router that uses fewer experts for some tokens): a full block adds
fc1's output by a scatter through its inverse permutation, a partial one by a
gather.

Legend: T tokens, K top-k, S rows (T per full block), F ffn (local), F1 = 2F.
"""
import torch
import torch.nn.functional as F


class SwiGLUMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base1_TF1, delta_SF1, g_S, sizes, pos_list, inv_list):
        z = delta_SF1  # fresh output of the fc1 LoRA up-projection: ours to modify
        blocks = z.split(sizes)
        blocks[0].add_(base1_TF1)
        for block, pos, inv in zip(blocks[1:], pos_list, inv_list):
            if inv is not None:
                block.index_add_(0, inv, base1_TF1)  # block[inv[r]] += base1[r]
            else:
                block.add_(base1_TF1.index_select(0, pos))
        gate, up = z.chunk(2, dim=-1)
        h = F.silu(gate)
        h.mul_(up)
        hbar = None
        if g_S is not None:
            h_blocks, g_blocks = h.split(sizes), g_S.split(sizes)
            hbar = h_blocks[0] * g_blocks[0].unsqueeze(-1)
            for hb, gb, pos in zip(h_blocks[1:], g_blocks[1:], pos_list):
                hbar.index_add_(0, pos, hb * gb.unsqueeze(-1))
        ctx.save_for_backward(z, h, g_S, *pos_list)
        ctx.sizes, ctx.K = sizes, len(pos_list) + 1
        if hbar is None:
            return h, z.new_empty(0)
        return h, hbar

    @staticmethod
    def backward(ctx, grad_h, grad_hbar):
        z, h, g_S, *pos_list = ctx.saved_tensors
        sizes = ctx.sizes
        grad_g = None
        if g_S is None:
            dh = grad_h
        else:
            # The incoming grad_h (fc2's LoRA input gradient, h's only other
            # consumer) is a fresh buffer: accumulate the fold's gradient into it.
            dh = grad_h if grad_h is not None else torch.zeros_like(h)
            h_blocks, g_blocks, dh_blocks = h.split(sizes), g_S.split(sizes), dh.split(sizes)
            grad_g = torch.empty_like(g_S)
            dg_blocks = grad_g.split(sizes)
            for j in range(ctx.K):
                gh = grad_hbar if j == 0 else grad_hbar.index_select(0, pos_list[j - 1])
                dh_blocks[j].addcmul_(gh, g_blocks[j].unsqueeze(-1).to(gh.dtype))
                # row-wise dot as a batched 1xF @ Fx1 product: no [T, F] temporary
                torch.bmm(gh.unsqueeze(1), h_blocks[j].unsqueeze(2), out=dg_blocks[j].view(-1, 1, 1))
        gate, up = z.chunk(2, dim=-1)
        # h is dead now (its consumers ran their backward first): reuse it
        sg = torch.ops.aten.silu.out(gate, out=h)
        if g_S is None:
            t = dh * up  # dh is autograd's buffer here: leave it intact
            torch.mul(dh, sg, out=up)
        else:
            sg.mul_(dh)       # d up
            t = dh.mul_(up)   # dh * up, for d gate
            up.copy_(sg)
        torch.ops.aten.silu_backward.grad_input(t, gate, grad_input=gate)  # d gate
        grad_z = z
        if ctx.K == 1:
            grad_base1 = grad_z
        else:
            blocks = grad_z.split(sizes)
            grad_base1 = blocks[0].clone()
            for block, pos in zip(blocks[1:], pos_list):
                grad_base1.index_add_(0, pos, block)
        return grad_base1, grad_z, grad_g, None, None, None


def swiglu_mixture(base1_TF1, delta_SF1, g_S, plan):
    """(h_S, hbar_TF or None). ``g_S`` None when every token has one row (the
    renormalised gate is 1); ``plan``: the local dispatch plan (dispatch/local.py)."""
    T = plan.num_tokens
    sizes = [n for j, n in enumerate(plan.block_sizes) if j == 0 or n > 0]
    pos_list, inv_list, start = [], [], T
    for n in sizes[1:]:
        pos = plan.block0_position(torch.arange(start, start + n, device=base1_TF1.device))
        inv = None
        if n == T:  # a full block is a permutation of the tokens: scatter through its inverse
            inv = torch.empty_like(pos)
            inv[pos] = torch.arange(T, device=pos.device)
        pos_list.append(pos)
        inv_list.append(inv)
        start += n
    h, hbar = SwiGLUMixture.apply(base1_TF1, delta_SF1, g_S, sizes, pos_list, inv_list)
    return h, (hbar if len(sizes) > 1 else None)
