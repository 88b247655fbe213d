"""Grouped matmul over contiguous row segments: the one seam for expert compute.

``grouped_linear(x_SI, w_GOI, counts_G)`` computes, for each group g, the rows
``x[off_g : off_g + counts_G[g]] @ w_GOI[g].T`` (nn.Linear convention) and
returns them in the same row order. It is an autograd Function whose backward
uses the same backend: dx = segments of dy @ w, dw_g = dy_g^T x_g.

A backend provides two primitives on contiguous segments:
``segment_mm(x_SK, w_GKN, counts) -> y_SN`` and
``segment_wgrad(a_SM, b_SN, counts) -> g_GMN`` (g_g = a_g^T b_g).

- ``"loop"``: a Python loop over the G segments writing into one preallocated
  output (``torch.mm(..., out=y[rows])``); empty groups are skipped. Rows are
  never sliced under autograd (DESIGN §4: per-expert ``x[s:e]`` under autograd
  zero-fills a gradient as large as ``x`` per slice).
- ``"torch_grouped_mm"``: ``torch._grouped_mm`` with int32 offsets, where the
  installed torch supports it (on CPU fp32 with 16-byte aligned strides; it
  falls back to the loop for a shape it refuses).

Legend: S sorted rows, G groups (experts, possibly repeated per top-k slot),
I in features, O out features, K/N generic matmul dims.
"""
from typing import Callable, Dict, List, Sequence

import torch


def _offsets(counts: Sequence[int]) -> List[int]:
    out, total = [0], 0
    for c in counts:
        total += int(c)
        out.append(total)
    return out


class LoopBackend:
    name = "loop"

    def segment_mm(self, x_SK, w_GKN, counts):
        y_SN = x_SK.new_empty(x_SK.shape[0], w_GKN.shape[-1])
        off = _offsets(counts)
        for g in range(len(counts)):
            if off[g + 1] > off[g]:
                torch.mm(x_SK[off[g]:off[g + 1]], w_GKN[g], out=y_SN[off[g]:off[g + 1]])
        return y_SN

    def segment_wgrad(self, a_SM, b_SN, counts):
        g_GMN = a_SM.new_zeros(len(counts), a_SM.shape[1], b_SN.shape[1])
        off = _offsets(counts)
        for g in range(len(counts)):
            if off[g + 1] > off[g]:
                torch.mm(a_SM[off[g]:off[g + 1]].t(), b_SN[off[g]:off[g + 1]], out=g_GMN[g])
        return g_GMN


class TorchGroupedMMBackend(LoopBackend):
    name = "torch_grouped_mm"

    def _offs(self, counts, device):
        return torch.tensor(_offsets(counts)[1:], dtype=torch.int32, device=device)

    def segment_mm(self, x_SK, w_GKN, counts):
        try:
            return torch._grouped_mm(x_SK, w_GKN, offs=self._offs(counts, x_SK.device))
        except RuntimeError:  # shapes/strides/dtypes the kernel refuses on this device
            return super().segment_mm(x_SK, w_GKN, counts)

    def segment_wgrad(self, a_SM, b_SN, counts):
        try:
            return torch._grouped_mm(a_SM.t(), b_SN, offs=self._offs(counts, a_SM.device))
        except RuntimeError:
            return super().segment_wgrad(a_SM, b_SN, counts)


GROUPED_MM_BACKENDS: Dict[str, object] = {
    "loop": LoopBackend(),
    "torch_grouped_mm": TorchGroupedMMBackend(),
}


def register_grouped_mm_backend(name: str, backend) -> None:
    """Add a backend object with ``segment_mm`` and ``segment_wgrad``."""
    for attr in ("segment_mm", "segment_wgrad"):
        if not isinstance(getattr(backend, attr, None), Callable):
            raise TypeError(f"grouped-mm backend {name!r} lacks a callable {attr!r}")
    GROUPED_MM_BACKENDS[name] = backend


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SI, w_GOI, counts, backend):
        ctx.save_for_backward(x_SI, w_GOI)
        ctx.counts, ctx.backend = counts, backend
        return backend.segment_mm(x_SI, w_GOI.transpose(1, 2), counts)

    @staticmethod
    def backward(ctx, dy_SO):
        x_SI, w_GOI = ctx.saved_tensors
        dy_SO = dy_SO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.backend.segment_mm(dy_SO, w_GOI, ctx.counts)
        if ctx.needs_input_grad[1]:
            dw = ctx.backend.segment_wgrad(dy_SO, x_SI, ctx.counts)
        return dx, dw, None, None


def grouped_linear(x_SI: torch.Tensor, w_GOI: torch.Tensor, counts: Sequence[int],
                   backend: str = "loop") -> torch.Tensor:
    """Rows of segment g times ``w_GOI[g].T``; ``counts`` are host ints summing to S."""
    if len(counts) != w_GOI.shape[0]:
        raise ValueError(f"grouped_linear: {len(counts)} counts for {w_GOI.shape[0]} weight groups")
    if sum(int(c) for c in counts) != x_SI.shape[0]:
        raise ValueError(f"grouped_linear: counts sum to {sum(counts)}, x_SI has {x_SI.shape[0]} rows")
    impl = GROUPED_MM_BACKENDS.get(backend)
    if impl is None:
        raise ValueError(f"grouped_mm_backend={backend!r}: unknown; known {sorted(GROUPED_MM_BACKENDS)}")
    return _GroupedLinear.apply(x_SI.contiguous(), w_GOI, list(counts), impl)
