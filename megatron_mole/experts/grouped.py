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
- ``"padded"``: every segment padded to the longest, one ``torch.bmm`` (PaddedBackend).
- ``"auto"`` (the default): the loop for few groups or long segments, padded for many
  short ones (MoLE at E >= 16 experts: the MLP's cost at fixed FLOPs stays flat in E,
  README "Cost flat in the number of experts"). On GPUs the grouped-GEMM path is
  ``torch_grouped_mm`` (one kernel, no padding; CUTLASS grouped GEMM on sm90).
- ``"torch_grouped_mm"``: ``torch._grouped_mm`` with int32 offsets where the
  operands are ones it accepts, checked up front (:func:`grouped_mm_supports`:
  CPU or CUDA, both fp32, both bf16 or both fp16, 16-byte aligned data and row
  strides); anything else takes the loop. Errors raised by the kernel itself
  (CUDA out of memory, a launch failure) propagate: they are never taken for
  "unsupported". Weight gradients of groups with no rows are zeroed after the
  call: for the 2d x 2d (weight-gradient) form some GPU kernels leave an empty
  group's output unwritten (uninitialised memory, not zeros), which would reach
  the optimizer as garbage gradients of the experts that got no tokens.

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
    """Also takes *periodic* groups (``periodic_groups``): W weights for G = k * W groups,
    group g using weight g % W (the slot-major rows of dispatch/local.py), without
    materialising k copies of the weights or of their gradients."""

    name = "loop"
    periodic_groups = True

    def segment_mm(self, x_SK, w_WKN, counts):
        y_SN = x_SK.new_empty(x_SK.shape[0], w_WKN.shape[-1])
        off, num_weights = _offsets(counts), w_WKN.shape[0]
        for g in range(len(counts)):
            if off[g + 1] > off[g]:
                torch.mm(x_SK[off[g]:off[g + 1]], w_WKN[g % num_weights], out=y_SN[off[g]:off[g + 1]])
        return y_SN

    def segment_wgrad(self, a_SM, b_SN, counts, num_weights=None):
        num_weights = num_weights or len(counts)
        g_WMN = a_SM.new_zeros(num_weights, a_SM.shape[1], b_SN.shape[1])
        off, written = _offsets(counts), set()
        for g in range(len(counts)):
            if off[g + 1] > off[g]:
                w = g % num_weights
                a, b = a_SM[off[g]:off[g + 1]].t(), b_SN[off[g]:off[g + 1]]
                if w in written:
                    g_WMN[w].addmm_(a, b)
                else:
                    torch.mm(a, b, out=g_WMN[w])
                    written.add(w)
        return g_WMN


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned_matrix(m: torch.Tensor) -> bool:
    """torch._grouped_mm's operand rule: 16-byte aligned data, and in the last two dims one
    stride 1 and the other at least the row length and a multiple of 16 bytes."""
    if m.dim() not in (2, 3) or m.data_ptr() % 16:
        return False
    per_16_bytes = 16 // m.element_size()
    (rows, cols), (row_stride, col_stride) = m.shape[-2:], m.stride()[-2:]
    if row_stride == 1 and col_stride >= max(1, rows):  # column-major
        return col_stride % per_16_bytes == 0
    if col_stride == 1 and row_stride >= max(1, cols):  # row-major
        return row_stride % per_16_bytes == 0
    return False


def grouped_mm_supports(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(a, b, offs=...)`` accepts these operands (checked without
    calling it, so that a failure inside the kernel is never mistaken for "unsupported")."""
    return (hasattr(torch, "_grouped_mm") and a.device == b.device and a.device.type in ("cpu", "cuda")
            and a.dtype == b.dtype and a.dtype in _GROUPED_MM_DTYPES
            and _aligned_matrix(a) and _aligned_matrix(b))


class TorchGroupedMMBackend(LoopBackend):
    name = "torch_grouped_mm"
    periodic_groups = False  # the kernel takes one weight per group

    def _offs(self, counts, device):
        return torch.tensor(_offsets(counts)[1:], dtype=torch.int32, device=device)

    def segment_mm(self, x_SK, w_GKN, counts):
        if not grouped_mm_supports(x_SK, w_GKN):
            return super().segment_mm(x_SK, w_GKN, counts)
        return torch._grouped_mm(x_SK, w_GKN, offs=self._offs(counts, x_SK.device))

    def segment_wgrad(self, a_SM, b_SN, counts):
        a_MS = a_SM.t()
        if not grouped_mm_supports(a_MS, b_SN):
            return super().segment_wgrad(a_SM, b_SN, counts)
        g_GMN = torch._grouped_mm(a_MS, b_SN, offs=self._offs(counts, a_SM.device))
        for g, count in enumerate(counts):
            if int(count) == 0:  # see the module docstring: not always written by the kernel
                g_GMN[g].zero_()
        return g_GMN


class PaddedBackend(LoopBackend):
    """Every segment padded to the longest one, one ``torch.bmm`` over the groups: one
    kernel instead of G small ones (many experts, few rows each, where the loop's per-call
    cost dominates; DESIGN §4). Padding rows are zeros, so they add nothing to the weight
    gradients. Costs G * max(counts) rows of work and a gather/scatter of the rows."""

    name = "padded"
    periodic_groups = True  # G = k * W groups: weight g % W (repeated for bmm, gradients summed)

    @staticmethod
    def _layout(counts, device):
        off = _offsets(counts)
        width = max(int(c) for c in counts) if counts else 0
        counts_G = torch.tensor([int(c) for c in counts], device=device)
        group_S = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_G)
        starts_G = torch.tensor(off[:-1], device=device)
        rows_S = torch.arange(off[-1], device=device)
        return width, group_S * width + (rows_S - starts_G[group_S])

    def _pad(self, x_SK, counts):
        width, slot_S = self._layout(counts, x_SK.device)
        x_PK = x_SK.new_zeros(len(counts) * width, x_SK.shape[1])
        x_PK.index_copy_(0, slot_S, x_SK)
        return x_PK.view(len(counts), width, x_SK.shape[1]), slot_S

    def segment_mm(self, x_SK, w_GKN, counts):
        if x_SK.shape[0] == 0:
            return x_SK.new_zeros(0, w_GKN.shape[-1])
        x_GWK, slot_S = self._pad(x_SK, counts)
        if w_GKN.shape[0] != len(counts):
            w_GKN = w_GKN.repeat(len(counts) // w_GKN.shape[0], 1, 1)
        y_GWN = torch.bmm(x_GWK, w_GKN)
        return y_GWN.reshape(-1, y_GWN.shape[-1]).index_select(0, slot_S)

    def segment_wgrad(self, a_SM, b_SN, counts, num_weights=None):
        if a_SM.shape[0] == 0:
            return a_SM.new_zeros(len(counts), a_SM.shape[1], b_SN.shape[1])
        a_GWM, slot_S = self._pad(a_SM, counts)
        b_GWN = b_SN.new_zeros(a_GWM.shape[0] * a_GWM.shape[1], b_SN.shape[1])
        b_GWN.index_copy_(0, slot_S, b_SN)
        g_GMN = torch.bmm(a_GWM.transpose(1, 2), b_GWN.view(a_GWM.shape[0], a_GWM.shape[1], -1))
        if num_weights and num_weights != len(counts):
            g_GMN = g_GMN.view(-1, num_weights, *g_GMN.shape[1:]).sum(0)
        return g_GMN


class AutoBackend:
    """The loop for few groups or long segments; padded bmm for many short ones when the
    padding stays small (G * max(counts) <= 2 S). Chosen per call from the host counts."""

    name = "auto"
    periodic_groups = True
    min_groups, max_mean_rows = 16, 256

    def __init__(self):
        self.loop, self.padded = LoopBackend(), PaddedBackend()

    def _pick(self, counts):
        total = sum(int(c) for c in counts)
        groups = len(counts)
        if groups >= self.min_groups and total and total <= self.max_mean_rows * groups \
                and groups * max(int(c) for c in counts) <= 2 * total:
            return self.padded
        return self.loop

    def segment_mm(self, x_SK, w_GKN, counts):
        return self._pick(counts).segment_mm(x_SK, w_GKN, counts)

    def segment_wgrad(self, a_SM, b_SN, counts, num_weights=None):
        return self._pick(counts).segment_wgrad(a_SM, b_SN, counts, num_weights)


GROUPED_MM_BACKENDS: Dict[str, object] = {
    "loop": LoopBackend(),
    "torch_grouped_mm": TorchGroupedMMBackend(),
    "padded": PaddedBackend(),
    "auto": AutoBackend(),
}


def register_grouped_mm_backend(name: str, backend) -> None:
    """Add a backend object with ``segment_mm`` and ``segment_wgrad``."""
    for attr in ("segment_mm", "segment_wgrad"):
        if not isinstance(getattr(backend, attr, None), Callable):
            raise TypeError(f"grouped-mm backend {name!r} lacks a callable {attr!r}")
    GROUPED_MM_BACKENDS[name] = backend


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SI, w_WOI, counts, backend):
        repeats = len(counts) // w_WOI.shape[0]
        # backends without periodic groups get one weight per group (copies)
        w_GOI = w_WOI if repeats == 1 or getattr(backend, "periodic_groups", False) else w_WOI.repeat(repeats, 1, 1)
        ctx.save_for_backward(x_SI, w_GOI)
        ctx.counts, ctx.backend, ctx.num_weights = counts, backend, w_WOI.shape[0]
        return backend.segment_mm(x_SI, w_GOI.transpose(1, 2), counts)

    @staticmethod
    def backward(ctx, dy_SO):
        x_SI, w_GOI = ctx.saved_tensors
        dy_SO = dy_SO.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ctx.backend.segment_mm(dy_SO, w_GOI, ctx.counts)
        if ctx.needs_input_grad[1]:
            if w_GOI.shape[0] != ctx.num_weights:  # copies: sum their gradients
                dw = ctx.backend.segment_wgrad(dy_SO, x_SI, ctx.counts)
                dw = dw.view(-1, ctx.num_weights, *dw.shape[1:]).sum(0)
            elif len(ctx.counts) != ctx.num_weights:
                dw = ctx.backend.segment_wgrad(dy_SO, x_SI, ctx.counts, ctx.num_weights)
            else:
                dw = ctx.backend.segment_wgrad(dy_SO, x_SI, ctx.counts)
        return dx, dw, None, None


def grouped_linear(x_SI: torch.Tensor, w_WOI: torch.Tensor, counts: Sequence[int],
                   backend: str = "loop") -> torch.Tensor:
    """Rows of segment g times ``w_WOI[g % W].T``; ``counts`` are host ints summing to S,
    one per group, a multiple of the W weights (slot-major groups: dispatch/local.py)."""
    if len(counts) % w_WOI.shape[0]:
        raise ValueError(f"grouped_linear: {len(counts)} counts is not a multiple of {w_WOI.shape[0]} weights")
    if sum(int(c) for c in counts) != x_SI.shape[0]:
        raise ValueError(f"grouped_linear: counts sum to {sum(counts)}, x_SI has {x_SI.shape[0]} rows")
    impl = GROUPED_MM_BACKENDS.get(backend)
    if impl is None:
        raise ValueError(f"grouped_mm_backend={backend!r}: unknown; known {sorted(GROUPED_MM_BACKENDS)}")
    return _GroupedLinear.apply(x_SI.contiguous(), w_WOI, list(counts), impl)
