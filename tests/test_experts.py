"""Expert compute and local dispatch against plain per-segment / per-token loops.

Legend: S rows, G groups, T tokens, K top-k, E experts, I/O features.
"""
import pytest
import torch

from megatron_mole.dispatch import LocalDispatcher
from megatron_mole.experts import GROUPED_MM_BACKENDS, grouped_linear


def _segments_reference(x_SI, w_GOI, counts):
    out, start = [], 0
    for g, c in enumerate(counts):
        out.append(x_SI[start:start + c] @ w_GOI[g].t())
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("backend", sorted(GROUPED_MM_BACKENDS))
@pytest.mark.parametrize("counts,in_f,out_f", [
    ([3, 0, 5, 2], 8, 4),          # an empty group
    ([0, 0, 7], 16, 12),           # leading empty groups
    ([4, 1, 1, 2, 0, 3], 5, 3),    # odd sizes (torch._grouped_mm refuses: loop fallback)
])
def test_grouped_linear_matches_segment_loop(backend, counts, in_f, out_f):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), in_f, generator=gen, dtype=torch.float32).requires_grad_()
    w = torch.randn(len(counts), out_f, in_f, generator=gen, dtype=torch.float32).requires_grad_()
    dy = torch.randn(sum(counts), out_f, generator=gen, dtype=torch.float32)
    y = grouped_linear(x, w, counts, backend)
    (y * dy).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = _segments_reference(x2, w2, counts)
    (y2 * dy).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_grouped_linear_errors_name_the_problem():
    x, w = torch.zeros(4, 3), torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="counts sum to 3"):
        grouped_linear(x, w, [1, 2])
    with pytest.raises(ValueError, match="3 counts is not a multiple of 2 weights"):
        grouped_linear(x, w, [1, 2, 1])
    with pytest.raises(ValueError, match="grouped_mm_backend='nope'"):
        grouped_linear(x, w, [2, 2], backend="nope")


def test_periodic_groups_equal_one_weight_per_group():
    """Slot-major groups (g uses weight g % W): the loop backend indexes the W weights and
    accumulates their gradients; a backend without periodic groups gets copies. Both equal
    a per-segment reference, output and gradients."""
    from megatron_mole.experts.grouped import LoopBackend, register_grouped_mm_backend

    class Copies(LoopBackend):
        periodic_groups = False

    register_grouped_mm_backend("test_copies", Copies())
    gen = torch.Generator().manual_seed(0)
    counts = [2, 0, 3, 1, 0, 4, 0, 2, 1]  # 3 slots x 3 weights, empty groups included
    x = torch.randn(sum(counts), 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    dy = torch.randn(sum(counts), 4, generator=gen, dtype=torch.float64)
    results = []
    for backend in ("loop", "test_copies", "padded", None):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        if backend is None:
            y = torch.cat([seg @ wi[g % 3].t() for g, seg in enumerate(xi.split(counts))])
        else:
            y = grouped_linear(xi, wi, counts, backend=backend)
        (y * dy).sum().backward()
        results.append((y.detach(), xi.grad, wi.grad))
    for got in results[:3]:
        for a, b in zip(got, results[3]):
            torch.testing.assert_close(a, b)


def test_auto_backend_pads_many_short_groups_only():
    from megatron_mole.experts.grouped import GROUPED_MM_BACKENDS

    auto = GROUPED_MM_BACKENDS["auto"]
    assert auto._pick([32] * 128) is auto.padded  # E=128 experts, 32 rows each
    assert auto._pick([512] * 8) is auto.loop  # few long segments
    assert auto._pick([1] * 63 + [500]) is auto.loop  # padding would multiply the work


@pytest.mark.parametrize("T,E,K", [(9, 4, 1), (9, 4, 2), (6, 3, 3), (5, 8, 2), (1, 2, 2)])
def test_local_dispatch_matches_per_token_loop(T, E, K):
    gen = torch.Generator().manual_seed(T * 100 + E * 10 + K)
    expert_idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    gates = torch.rand(T, K, generator=gen)
    x = torch.randn(T, 6, generator=gen)
    d = LocalDispatcher(E)
    x_S, gates_S, plan = d.permute(x, expert_idx, gates)
    assert plan.counts_G == [int(((expert_idx[:, j] == e)).sum()) for j in range(K) for e in range(E)]
    # every (slot, token) assignment is one row, in its (slot, expert) group, token order kept
    start = 0
    for j in range(K):
        for e in range(E):
            rows = [t for t in range(T) if expert_idx[t, j] == e]
            n = len(rows)
            torch.testing.assert_close(x_S[start:start + n], x[rows])
            torch.testing.assert_close(gates_S[start:start + n], gates[rows, j])
            start += n
    # combine: weighted sum over slots of the rows of each token
    y_S = torch.randn(x_S.shape[0], 3, generator=gen)
    w = torch.rand(T, K, generator=gen)
    got = d.combine(y_S, plan, w)
    for t in range(T):
        want = sum(w[t, j] * y_S[plan.row_of_KT[j, t]] for j in range(K))
        torch.testing.assert_close(got[t], want)
    # block 0 holds every token once (the MLP scope relies on it)
    assert sorted(plan.tok_S[:T].tolist()) == list(range(T))


def test_torch_grouped_mm_checks_support_up_front_and_lets_kernel_errors_through(monkeypatch):
    """Unsupported operands (odd strides, float64) go to the loop without calling the kernel; an
    error inside the kernel (here a simulated CUDA OOM) propagates instead of silently looping."""
    from megatron_mole.experts import grouped

    x, w = torch.randn(6, 5), torch.randn(2, 3, 5)
    assert not grouped.grouped_mm_supports(x, w.transpose(1, 2))  # 5 fp32 = 20-byte rows
    assert not grouped.grouped_mm_supports(torch.randn(6, 8, dtype=torch.float64), torch.randn(2, 8, 4).double())
    assert not grouped.grouped_mm_supports(torch.randn(6, 8), torch.randn(2, 8, 4, dtype=torch.bfloat16))
    assert grouped.grouped_mm_supports(torch.randn(6, 8), torch.randn(2, 8, 4))

    def refuse(*args, **kwargs):
        raise AssertionError("torch._grouped_mm called for unsupported operands")

    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    want = _segments_reference(x, w, [4, 2])
    torch.testing.assert_close(grouped_linear(x, w, [4, 2], "torch_grouped_mm"), want)

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "_grouped_mm", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        grouped_linear(torch.randn(6, 8), torch.randn(2, 4, 8), [4, 2], "torch_grouped_mm")


def test_torch_grouped_mm_zeroes_weight_grads_of_empty_groups(monkeypatch):
    """A kernel that leaves an empty group's weight-gradient output unwritten (NaN here, as
    uninitialised memory would be) does not reach w.grad: those groups are zeroed."""
    real = torch._grouped_mm

    def leaves_empty_groups_unwritten(a, b, offs):
        out = real(a, b, offs=offs)
        if a.dim() == 2 and b.dim() == 2:  # the 2d x 2d (weight-gradient) form
            starts = torch.cat([offs.new_zeros(1), offs[:-1]])
            out[offs == starts] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", leaves_empty_groups_unwritten)
    counts = [3, 0, 5, 0]
    x = torch.randn(8, 8)
    w = torch.randn(4, 4, 8, requires_grad=True)
    grouped_linear(x, w, counts, "torch_grouped_mm").sum().backward()
    assert torch.equal(w.grad[1], torch.zeros(4, 8)) and torch.equal(w.grad[3], torch.zeros(4, 8))
    w2 = w.detach().clone().requires_grad_()
    _segments_reference(x, w2, counts).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
