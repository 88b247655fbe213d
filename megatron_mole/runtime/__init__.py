"""Process groups, device selection and Megatron-core's parallel state.

``init_distributed`` is the one entry point: it reads the torchrun environment
(or runs as a single process without one), starts ``torch.distributed`` (nccl on
GPUs, gloo on CPU), initialises Megatron-core's ``parallel_state`` and its RNG
tracker, and applies the runtime patches the device needs
(:mod:`megatron_mole.runtime.cpu`): all of them on CPU; on CUDA only those needed
where Transformer Engine is absent (none when it is installed). Bad sizes or devices
raise ``errors.ConfigError`` (a ``ValueError``) naming the values.

``set_model_parallel`` switches the TP/PP/EP layout inside running processes
(tests compare many layouts in one launch; process start-up costs seconds); it
destroys the old layout's process groups (Megatron leaves its NCCL ones alive).
``cpu_group`` gives a gloo group over a group's ranks for object collectives.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mole.errors import ConfigError
from megatron_mole.runtime import cpu as cpu_runtime

__all__ = [
    "RuntimeInfo",
    "init_distributed",
    "set_model_parallel",
    "get_device",
    "resolve_device",
    "get_runtime",
    "is_initialized",
    "shutdown",
    "cpu_group",
]


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    ep: int
    etp: int
    vpp: Optional[int]
    seed: int
    patches: tuple = ()  # names of the runtime patches applied (runtime/cpu.py PATCHES)

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense part (world / (tp * pp))."""
        return self.world_size // (self.tp * self.pp)

    @property
    def layout(self) -> tuple:
        return (self.tp, self.pp, self.ep, self.etp, self.vpp)


_RUNTIME: Optional[RuntimeInfo] = None


def resolve_device(device) -> torch.device:
    """``"auto"`` / ``"cpu"`` / ``"cuda"`` (or a torch.device) -> this rank's device
    (``cuda:LOCAL_RANK``); an unusable request is a ConfigError naming it."""
    if isinstance(device, torch.device):
        kind = device.type
    elif isinstance(device, str):
        kind = device.split(":")[0]
    else:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' was requested but torch.cuda.is_available() is False")
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            # Without this check the rank dies later in torch.cuda.set_device with "invalid device ordinal".
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {visible} visible CUDA device(s) "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): start at most "
                f"{visible} process(es) per node (torchrun --nproc-per-node {visible}), or pass device='cpu'"
            )
        return torch.device("cuda", local_rank)
    if kind == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda'; got {device!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_positive(**sizes):
    for name, value in sizes.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}")


def _check_layout(world_size, tp, pp, ep, etp):
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp} = {tp * pp}"
        )
    if world_size % (etp * ep * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{ep}*{pp} = "
            f"{etp * ep * pp} (expert tensor parallel {etp}, expert parallel {ep}, pipeline {pp})"
        )


def _init_model_parallel(tp, pp, ep, etp, vpp, seed):
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    # Megatron seeds the CUDA default generator with `seed`; on CPU the default
    # generator is the CPU one, so seed it too (harmless on CUDA).
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    device="auto",
    seed: int = 1234,
    etp: Optional[int] = None,
    vpp: Optional[int] = None,
    timeout_minutes: float = 30.0,
) -> RuntimeInfo:
    """Initialise torch.distributed and Megatron-core's parallel state.

    Args:
        tp, pp, ep: tensor-, pipeline- and expert-parallel sizes.
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda". A CUDA rank uses
            ``cuda:LOCAL_RANK``; LOCAL_RANK beyond the visible device count is an error.
        seed: seeds Megatron's RNG tracker (and the default generator).
        etp: expert tensor-parallel size; defaults to ``tp`` (experts follow the base's TP).
        vpp: virtual pipeline size (interleaved schedule), or None.

    A second call with the same arguments returns the existing runtime; with other
    sizes it raises (use :func:`set_model_parallel` to switch layouts on purpose).
    """
    global _RUNTIME
    etp = tp if etp is None else etp
    _check_positive(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp)
    resolved = resolve_device(device)
    if _RUNTIME is not None:
        asked = (tp, pp, ep, etp, vpp)
        if asked != _RUNTIME.layout or resolved.type != _RUNTIME.device.type:
            raise RuntimeError(
                f"init_distributed was already called with tp={_RUNTIME.tp}, pp={_RUNTIME.pp}, "
                f"ep={_RUNTIME.ep}, etp={_RUNTIME.etp}, vpp={_RUNTIME.vpp}, "
                f"device={_RUNTIME.device.type}; now asked for tp={tp}, pp={pp}, ep={ep}, etp={etp}, "
                f"vpp={vpp}, device={resolved.type}. Use set_model_parallel() to switch layouts."
            )
        return _RUNTIME

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _check_layout(world_size, tp, pp, ep, etp)

    patches = tuple(cpu_runtime.apply_runtime(resolved.type))
    if resolved.type == "cpu":
        backend = "gloo"
    else:
        torch.cuda.set_device(resolved)
        backend = "nccl"

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            # A single process without torchrun.
            if world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun"
                )
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    else:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        _check_layout(world_size, tp, pp, ep, etp)

    _init_model_parallel(tp, pp, ep, etp, vpp, seed)
    _RUNTIME = RuntimeInfo(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=resolved,
        backend=backend,
        tp=tp,
        pp=pp,
        ep=ep,
        etp=etp,
        vpp=vpp,
        seed=seed,
        patches=patches,
    )
    return _RUNTIME


def set_model_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    seed: Optional[int] = None,
    etp: Optional[int] = None,
    vpp: Optional[int] = None,
) -> RuntimeInfo:
    """Switch the Megatron layout in running processes (destroy + initialise)."""
    global _RUNTIME
    runtime = get_runtime()
    etp = tp if etp is None else etp
    seed = runtime.seed if seed is None else seed
    _check_positive(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp)
    _check_layout(runtime.world_size, tp, pp, ep, etp)
    _destroy_model_parallel()
    _init_model_parallel(tp, pp, ep, etp, vpp, seed)
    _RUNTIME = dataclasses.replace(runtime, tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp, seed=seed)
    return _RUNTIME


def _destroy_model_parallel() -> None:
    """Megatron's ``destroy_model_parallel`` and the communicators behind its groups.

    Megatron-core 0.16.1 destroys only its gloo groups and forgets the others: every layout
    switch would leave NCCL communicators (GPU memory, and a limited number per process)
    alive. Megatron lists the groups this rank belongs to (``create_group`` appends them to
    ``_global_process_group_list``, with None for the default group); destroy those that
    are still registered. Every rank switches at the same point, in the same group order.
    """
    from megatron.core import parallel_state

    groups = [g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None]
    _drop_cpu_groups()
    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    live = dist.distributed_c10d._world.pg_map
    for group in groups:
        if group in live and group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)


_CPU_GROUPS: dict = {}  # ranks -> a gloo group over them (cpu_group)


def cpu_group(group=None):
    """A gloo group over the ranks of ``group`` (None: the whole world), for moving Python
    objects (``all_gather_object``) through host memory.

    Under NCCL ``all_gather_object`` pickles into a CUDA tensor and gathers every rank's
    bytes on every GPU; through gloo they stay on the CPU. On a gloo run ``group`` itself is
    returned. The gloo group is made on first use by the member ranks only
    (``use_local_synchronization``) and kept until the layout changes or ``shutdown``.
    """
    if dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    if ranks not in _CPU_GROUPS:
        _CPU_GROUPS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _CPU_GROUPS[ranks]


def _drop_cpu_groups() -> None:
    live = dist.distributed_c10d._world.pg_map if dist.is_initialized() else {}
    for group in _CPU_GROUPS.values():
        if group in live:
            dist.destroy_process_group(group)
    _CPU_GROUPS.clear()


def get_runtime() -> RuntimeInfo:
    if _RUNTIME is None:
        raise RuntimeError("megatron_mole.init_distributed() has not been called")
    return _RUNTIME


def is_initialized() -> bool:
    return _RUNTIME is not None


def get_device() -> torch.device:
    """The device of this rank (after init_distributed), else the best available one."""
    if _RUNTIME is not None:
        return _RUNTIME.device
    return resolve_device("auto")


def shutdown() -> None:
    """Destroy Megatron's groups and the process group; undo the runtime patches."""
    global _RUNTIME
    if _RUNTIME is None:
        return
    _destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_runtime.remove_cpu_runtime()
    _RUNTIME = None
