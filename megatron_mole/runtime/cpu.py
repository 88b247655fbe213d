"""Running unmodified Megatron-core on CPU (gloo), and without Transformer Engine.

Megatron-core assumes CUDA in many places (DESIGN.md §4 lists what was measured).
This module maps those places to the CPU so that Megatron's own ``GPTModel`` /
``HybridModel``, its pipeline schedules, DDP and optimizers run forward and
backward on a CPU box. Every patch is one entry of :data:`PATCHES`, with the
reason it exists, its scope and the Megatron-core versions it was checked on;
:func:`applied_patches` tells which are active.

Scopes (:func:`megatron_mole.runtime.init_distributed` applies them):

* ``"cpu"``: only when the run's device is the CPU (device mapping, streams, RNG).
* ``"no-te"``: wherever Transformer Engine is absent, CPU *and* CUDA: Megatron's
  local layer spec picks ``WrappedTorchNorm`` on any device, and it refuses
  sequence parallelism; ``moe_utils.te_general_gemm`` is undefined without TE.
  A CUDA run with TE patches nothing.

Two kinds of patch:

* a :class:`torch.overrides.TorchFunctionMode` (``CudaToCpuMode``) that rewrites
  ``device="cuda"`` / integer device arguments to the CPU, makes ``Tensor.cuda()``
  a no-op and lets ``Tensor.type()`` report ``torch.cuda.*`` names (Megatron's
  optimizers assert them). The mode is thread-local state that autograd carries
  into backward, so allocations inside custom ``backward`` functions are mapped
  too.
* attribute swaps on ``torch.cuda`` and Megatron modules (streams, events,
  ``current_device``, the RNG tracker, the torch norm).

Each patch carries the megatron-core range it was checked on (``Patch.tested``);
applying one outside its range warns once, naming the patch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable, List

import torch
from torch.overrides import TorchFunctionMode

from megatron_mole.runtime import compat

# Every patch was checked on these ends, inclusive; the whole suite ran on 0.16.1 and 0.19.2
# (README "Supported Megatron-core versions").
_TESTED_RANGE = ("0.16.0", "0.19.2")

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


CPU = "cpu"
NO_TE = "no-te"


@dataclasses.dataclass
class Patch:
    name: str
    reason: str
    apply: Callable[[], Callable[[], None]]  # returns its undo
    scope: str = CPU  # CPU: CPU runs only; NO_TE: any device without Transformer Engine
    # megatron-core versions it was checked on (inclusive): skipped before ``lo`` (what it
    # patches does not exist there), applied with a warning after ``hi``.
    tested: tuple = _TESTED_RANGE


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


class _DropMessage:
    """A logging filter that drops one message."""

    def __init__(self, message: str):
        self.message = message

    def filter(self, record) -> bool:
        return record.getMessage() != self.message


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

    # The tracker's fork() warns when the CPU state changes inside a "CUDA" fork: here both
    # are the one CPU generator, so every dropout under a fork would warn.
    quiet = _DropMessage("CPU RNG state changed within GPU RNG context")
    mrandom.logging.getLogger(mrandom.__name__).addFilter(quiet)
    undos = [
        lambda: mrandom.logging.getLogger(mrandom.__name__).removeFilter(quiet),
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


def _patch_hybrid_final_norm():
    try:
        from megatron.core.models.hybrid import hybrid_block
    except ImportError:  # < 0.19: no HybridModel
        return lambda: None
    from megatron.core.transformer import torch_norm

    # HybridStack builds its final norm as TENorm, which raises without TE; the torch
    # norm computes the same RMSNorm/LayerNorm that GPTModel's local spec uses.
    return _swap(hybrid_block, "TENorm", torch_norm.WrappedTorchNorm)


def _patch_clip_vit_norm():
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer import torch_norm

    init = clip_vit_model.CLIPViTModel.__init__
    defaults = init.__defaults__ or ()
    if torch.nn.LayerNorm not in defaults:  # Transformer Engine present: TENorm is right
        return lambda: None
    # Without TE the ViT's ln_pre/ln_post default to torch.nn.LayerNorm, which Megatron's
    # build_module calls with config=..., hidden_size=... (a TypeError). Megatron's torch norm
    # takes those arguments and builds the same LayerNorm (weight and bias, the config's eps).
    patched = tuple(torch_norm.WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in defaults)
    return _swap(init, "__defaults__", patched)


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
        "WrappedTorchNorm (the local spec's norm without TE, on any device) refuses "
        "sequence_parallel=True; build it and mark its params sequence_parallel so "
        "finalize_model_grads all-reduces their grads over TP",
        _patch_torch_norm,
        scope=NO_TE,
    ),
    Patch(
        "moe-te-general-gemm",
        "moe_utils.te_general_gemm is undefined without Transformer Engine (NameError in "
        "the MoE router on any device); the router checks it against None",
        _patch_te_general_gemm,
        scope=NO_TE,
    ),
    Patch(
        "hybrid-final-norm",
        "HybridStack (>= 0.19) builds its final norm as TENorm, which raises without "
        "Transformer Engine; build Megatron's torch norm instead (no HybridModel before 0.19)",
        _patch_hybrid_final_norm,
        scope=NO_TE,
        tested=("0.19.0", "0.19.2"),
    ),
    Patch(
        "clip-vit-norm",
        "CLIPViTModel (LLaVAModel's vision tower) defaults its pre/post norm to torch.nn.LayerNorm "
        "without Transformer Engine and builds it with a config= keyword LayerNorm refuses; "
        "default to Megatron's torch norm (the same LayerNorm) instead",
        _patch_clip_vit_norm,
        scope=NO_TE,
    ),
]

_UNDO: List[Callable[[], None]] = []
_APPLIED: List[str] = []
_WARNED = set()


def in_version_range(patch: Patch, warn: bool = True) -> bool:
    """Whether ``patch`` applies to the installed megatron-core: not before its tested
    range (the code it patches is newer); past the range it applies and warns once."""
    lo, hi = patch.tested
    version = compat.version_tuple()
    if version[:len(compat.version_tuple(lo))] < compat.version_tuple(lo):
        return False
    if version > compat.version_tuple(hi) and warn and patch.name not in _WARNED:
        _WARNED.add(patch.name)
        warnings.warn(
            f"megatron_mole's runtime patch {patch.name!r} was checked against megatron-core "
            f"{lo} to {hi}; found {compat.megatron_version()}. It may need changes.",
            stacklevel=4,
        )
    return True


def patches_for(device_type: str, have_te: bool) -> List[Patch]:
    """The patches a run on ``device_type`` needs with the installed megatron-core: on CPU
    all of them; elsewhere the NO_TE ones when Transformer Engine is absent, else none."""
    wanted = [p for p in PATCHES if device_type == "cpu" or (p.scope == NO_TE and not have_te)]
    return [p for p in wanted if in_version_range(p, warn=False)]


def apply_runtime(device_type: str = "cpu") -> List[str]:
    """Applies the patches a ``device_type`` run needs (idempotent); returns their names."""
    if _APPLIED:
        return list(_APPLIED)
    for patch in patches_for(device_type, compat.have_transformer_engine()):
        in_version_range(patch)
        _UNDO.append(patch.apply())
        _APPLIED.append(patch.name)
    return list(_APPLIED)


def apply_cpu_runtime() -> List[str]:
    """Applies every patch in :data:`PATCHES` (a CPU run)."""
    return apply_runtime("cpu")


def remove_cpu_runtime() -> None:
    """Undoes every applied patch, newest first."""
    while _UNDO:
        _UNDO.pop()()
    _APPLIED.clear()


def applied_patches() -> List[str]:
    return list(_APPLIED)
