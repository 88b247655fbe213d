"""Running unmodified Megatron-core on CPU (gloo), and nothing else.

Megatron-core assumes CUDA in many places (DESIGN.md §4 lists what was measured).
This module maps those places to the CPU so that Megatron's own ``GPTModel``,
its pipeline schedules, DDP and optimizers run forward and backward on a CPU
box. It is applied by :func:`megatron_mole.runtime.init_distributed` only when
the run's device is the CPU; a CUDA run patches nothing. Every patch is one
entry of :data:`PATCHES`, with the reason it exists; :func:`applied_patches`
tells which are active.

Two kinds of patch:

* a :class:`torch.overrides.TorchFunctionMode` (``CudaToCpuMode``) that rewrites
  ``device="cuda"`` / integer device arguments to the CPU, makes ``Tensor.cuda()``
  a no-op and lets ``Tensor.type()`` report ``torch.cuda.*`` names (Megatron's
  optimizers assert them). The mode is thread-local state that autograd carries
  into backward, so allocations inside custom ``backward`` functions are mapped
  too.
* attribute swaps on ``torch.cuda`` and Megatron modules (streams, events,
  ``current_device``, the RNG tracker, the torch norm).

Checked against megatron-core 0.16.0–0.16.1; other versions warn once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, List

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON_VERSIONS = ("0.16.0", "0.16.1")

_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's optimizers assert param.type() == 'torch.cuda.FloatTensor'.
            name = _TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, *args, **kwargs):
        return 0.0


@dataclasses.dataclass
class Patch:
    name: str
    reason: str
    apply: Callable[[], Callable[[], None]]  # returns its undo


def _swap(obj, attr, value):
    missing = object()
    old = getattr(obj, attr, missing)
    setattr(obj, attr, value)

    def undo():
        if old is missing:
            delattr(obj, attr)
        else:
            setattr(obj, attr, old)

    return undo


def _undo_all(undos):
    def undo():
        for u in reversed(undos):
            u()

    return undo


def _patch_device_mode():
    import torch.autograd as autograd

    mode = CudaToCpuMode()
    engine = autograd._engine_run_backward

    def engine_under_mode(*args, **kwargs):
        # torch.autograd.backward dispatches to the mode, and a mode is switched off
        # while its handler runs; Megatron's custom backward functions allocate on
        # "cuda", so the engine itself must run with the mode pushed.
        with mode:
            return engine(*args, **kwargs)

    mode.__enter__()
    undo_engine = _swap(autograd, "_engine_run_backward", engine_under_mode)

    def undo():
        undo_engine()
        mode.__exit__(None, None, None)

    return undo


def _patch_torch_cuda():
    cuda = torch.cuda
    undos = [
        _swap(cuda, "current_device", lambda: 0),
        _swap(cuda, "Stream", _NoOpStream),
        _swap(cuda, "Event", _NoOpStream),
        _swap(cuda, "current_stream", lambda *a, **k: _NoOpStream()),
        _swap(cuda, "default_stream", lambda *a, **k: _NoOpStream()),
        _swap(cuda, "stream", lambda *a, **k: contextlib.nullcontext()),
        _swap(cuda, "synchronize", lambda *a, **k: None),
        _swap(cuda, "empty_cache", lambda *a, **k: None),
        _swap(cuda, "memory_allocated", lambda *a, **k: 0),
        _swap(cuda, "max_memory_allocated", lambda *a, **k: 0),
    ]
    return _undo_all(undos)


def _patch_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker

    class CpuRNGStatesTracker(base):
        """Megatron's tracker on the CPU default generator; a subclass of Megatron's
        CudaRNGStatesTracker so that isinstance checks inside Megatron keep holding."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


    def get_state(device="cuda", clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    undos = [
        _swap(mrandom, "CudaRNGStatesTracker", CpuRNGStatesTracker),
        _swap(mrandom, "_get_cuda_rng_state", get_state),
        _swap(mrandom, "_set_cuda_rng_state", set_state),
    ]
    # A tracker created before the patch would be a CUDA one: recreate it.
    mrandom.initialize_rng_tracker(force_reset=True)
    undos.append(lambda: mrandom.initialize_rng_tracker(force_reset=True))
    return _undo_all(undos)


def _patch_torch_norm():
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sequence_parallel = config.sequence_parallel
        if sequence_parallel:
            # The norm itself is position-wise: with SP each TP rank normalises its own
            # slice of the sequence. Its weights are replicated, so their grads are
            # partial per rank; Megatron all-reduces params marked sequence_parallel.
            config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps=eps, **kwargs)
        finally:
            if sequence_parallel:
                config.sequence_parallel = True
        for param in norm.parameters():
            setattr(param, "sequence_parallel", sequence_parallel)
        return norm

    return _swap(torch_norm.WrappedTorchNorm, "__new__", staticmethod(__new__))


def _patch_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return lambda: None
    return _swap(moe_utils, "te_general_gemm", None)


PATCHES: List[Patch] = [
    Patch(
        "cuda-device-mode",
        "literal device='cuda' / torch.cuda.current_device() allocations (global memory buffer, "
        "SP gathers, pipeline schedules), Tensor.cuda(), and the optimizers' "
        "param.type() == 'torch.cuda.FloatTensor' asserts",
        _patch_device_mode,
    ),
    Patch(
        "torch-cuda-stubs",
        "torch.cuda.current_device/Stream/Event/stream/synchronize are called unconditionally "
        "(token dispatchers, DDP, schedules); on CPU work is already ordered",
        _patch_torch_cuda,
    ),
    Patch(
        "rng-tracker",
        "Megatron's RNG tracker and activation-recompute RNG save/restore use the CUDA "
        "generator; map them to the CPU default generator",
        _patch_rng_tracker,
    ),
    Patch(
        "torch-norm-sequence-parallel",
        "WrappedTorchNorm refuses sequence_parallel=True; build it and mark its params "
        "sequence_parallel so finalize_model_grads all-reduces their grads over TP",
        _patch_torch_norm,
    ),
    Patch(
        "moe-te-general-gemm",
        "moe_utils.te_general_gemm is undefined without Transformer Engine; the router "
        "checks it against None",
        _patch_te_general_gemm,
    ),
]

_UNDO: List[Callable[[], None]] = []
_APPLIED: List[str] = []
_WARNED = False


def _check_version():
    global _WARNED
    from megatron.core import package_info

    version = package_info.__version__
    if version not in TESTED_MEGATRON_VERSIONS and not _WARNED:
        _WARNED = True
        warnings.warn(
            f"megatron_mole's CPU runtime was checked against megatron-core "
            f"{', '.join(TESTED_MEGATRON_VERSIONS)}; found {version}. It may need new patches.",
            stacklevel=3,
        )


def apply_cpu_runtime() -> List[str]:
    """Applies every patch in :data:`PATCHES` (idempotent); returns their names."""
    if _APPLIED:
        return list(_APPLIED)
    _check_version()
    for patch in PATCHES:
        _UNDO.append(patch.apply())
        _APPLIED.append(patch.name)
    return list(_APPLIED)


def remove_cpu_runtime() -> None:
    """Undoes every applied patch, newest first."""
    while _UNDO:
        _UNDO.pop()()
    _APPLIED.clear()


def applied_patches() -> List[str]:
    return list(_APPLIED)
