"""Atomic, multi-rank checkpoint files for fine-tuning runs.

Layout of ``ROOT`` (a directory every rank can see)::

    ROOT/latest              "step_N": the last complete checkpoint (the commit point)
    ROOT/step_N/shared.pt    written once by rank 0: adapters (full tensors, global names),
                             scheduler, data sampler position, base reference, config ...
    ROOT/step_N/rank_00000.pt  one per rank: RNG states ...
    ROOT/step_N/optimizer/   written by all ranks together (``collective``): the training loop's
                             optimizer state in Megatron's dist_checkpointing format (optim_state.py)
    ROOT/step_N/manifest.json  step, world size, and each file's size and sha256 (subfolders too)

A save writes into ``ROOT/.tmp_step_N``, flushes and fsyncs every file, and only
then does rank 0 rename the directory to ``step_N`` and replace ``latest`` (write
``latest.tmp``, fsync, ``os.replace``). A process killed at any moment leaves the
previous checkpoint and the ``latest`` that names it untouched: a half-written
``.tmp_step_N`` is removed by the next save, and a complete ``step_N`` that
``latest`` never reached is an orphan the next save of that step replaces.
Pruning (``keep_last``) renames old steps to ``.trash_step_N`` before deleting,
so a half-deleted directory never looks like a checkpoint.

Multi-rank protocol (``barrier`` is any callable that blocks until every rank
reached it, e.g. ``torch.distributed.barrier``; all ranks call ``save_checkpoint``
with the same step): rank 0 prepares the temporary directory; barrier; each rank
writes its file, then all ranks run ``collective(ROOT/.tmp_step_N/optimizer)``; barrier;
rank 0 writes the shared file and the manifest (hashing all files), renames, updates
``latest``, prunes; barrier. On a network file system
this relies on close-to-open consistency for rank 0 to see the others' files.

Payloads are saved with ``torch.save`` and loaded with ``weights_only=True`` by
default: keep them to tensors, numbers, strings, lists, tuples and dicts
(``capture_rng_state`` stores numpy's state as a tensor for that reason).
"""
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megatron_mole.errors import CheckpointError  # the one CheckpointError; re-exported as ckpt_io.CheckpointError

FORMAT_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
SHARED = "shared.pt"
COLLECTIVE_DIR = "optimizer"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step}"


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): rename is what we can do
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes):
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path):
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _serialize(payload) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_steps(root) -> list:
    """Steps of the complete-looking ``step_N`` directories (with a manifest), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(root) -> int | None:
    """The step named by ``ROOT/latest``; None when there is no marker."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    match = _STEP_DIR.match(text)
    if not match:
        raise CheckpointError(f"{marker}: expected 'step_N', found {text[:40]!r}")
    return int(match.group(1))


def _discard(path: Path, trash: Path):
    """Rename aside, then delete, so a crash mid-delete leaves nothing that looks like a checkpoint."""
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _commit(root: Path, step: int, tmp: Path, world_size: int, keep_last: int | None) -> Path:
    """Rank 0, after every rank's file is durable: manifest, rename, marker, pruning."""
    files = {}
    for name in [SHARED] + [rank_file(r) for r in range(world_size)]:
        path = tmp / name
        if not path.is_file():
            if name == SHARED:
                continue
            raise CheckpointError(f"{path} was not written (rank {int(name[5:10])} did not save step {step})")
        files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    collective = tmp / COLLECTIVE_DIR
    for path in sorted(collective.rglob("*")) if collective.is_dir() else []:
        if path.is_file():
            _fsync_file(path)  # written by the ranks (dist_checkpointing); durable before the rename
            files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "files": files}
    _write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)

    final = step_dir(root, step)
    if final.exists():  # not the latest (checked by every rank on entry): an orphan of a killed save
        _discard(final, root / f".trash_step_{step}")
    os.rename(tmp, final)
    _fsync_dir(root)
    _write_durable(root / (LATEST + ".tmp"), f"step_{step}\n".encode())
    os.replace(root / (LATEST + ".tmp"), root / LATEST)
    _fsync_dir(root)

    for entry in root.iterdir():  # leftovers of saves killed earlier
        if entry.name.startswith((".tmp_step_", ".trash_step_")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last is not None:
        older = [s for s in list_steps(root) if s < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _discard(step_dir(root, old), root / f".trash_step_{old}")
    return final


def save_checkpoint(root, step: int, rank_payload, *, shared_payload=None, rank: int = 0,
                    world_size: int = 1, barrier: Callable[[], None] | None = None,
                    keep_last: int | None = None, collective: Callable[[Path], None] | None = None) -> Path:
    """Save this rank's part of checkpoint ``step`` under ``root``; returns ``root/step_N``.

    Every rank calls it with the same ``step``. ``rank_payload`` is this rank's state
    (RNG); ``shared_payload`` is taken from rank 0 only (adapters, scheduler, sampler,
    base reference). ``collective(directory)`` (optional, called by every rank) writes
    files all ranks save together into the existing, empty ``directory`` (the optimizer
    state); they are hashed into the manifest like the others. ``keep_last`` keeps that
    many newest steps.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    if world_size > 1 and barrier is None:
        raise ValueError(f"world_size={world_size} needs a barrier callable (e.g. torch.distributed.barrier)")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    barrier = barrier or (lambda: None)
    root = Path(root)
    # Every rank checks (the directory is shared), so all of them refuse together instead of
    # leaving the others waiting at a barrier that rank 0 never reaches.
    current = latest_step(root)
    if step_dir(root, step).exists() and current is not None and step <= current:
        raise CheckpointError(f"{step_dir(root, step)} already exists and is not newer than latest "
                              f"(step_{current}); refusing to overwrite it (save into another directory)")
    tmp = root / f".tmp_step_{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if collective is not None:
            (tmp / COLLECTIVE_DIR).mkdir()
    barrier()
    if not tmp.is_dir():
        raise CheckpointError(f"rank {rank}: {tmp} does not exist after the barrier; is {root} shared by all ranks?")
    _write_durable(tmp / rank_file(rank), _serialize(rank_payload))
    if collective is not None:
        collective(tmp / COLLECTIVE_DIR)
    if rank == 0 and shared_payload is not None:
        _write_durable(tmp / SHARED, _serialize(shared_payload))
    barrier()
    final = _commit(root, step, tmp, world_size, keep_last) if rank == 0 else step_dir(root, step)
    barrier()
    return final


@dataclass
class Checkpoint:
    step: int
    path: Path
    world_size: int  # ranks that saved it
    shared: object  # shared_payload, or None if none was saved
    rank_state: object  # this rank's rank_payload; None when not asked for
    collective_dir: Path | None = None  # the files all ranks saved together (verified), or None


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: {path} is not a complete checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
        manifest["files"], manifest["step"], manifest["world_size"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt ({error})") from None
    return manifest


def _check_file(path: Path, entry: dict):
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (listed in the manifest)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path} is corrupt: {size} bytes, the manifest says {entry['bytes']}")
    if _sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path} is corrupt: sha256 differs from the manifest")


def _load_file(path: Path, entry: dict | None, weights_only: bool):
    if entry is None:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST}")
    _check_file(path, entry)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path} could not be loaded: {type(error).__name__}: {error}") from None


def load_checkpoint(root, step: int | None = None, *, rank: int | None = None,
                    weights_only: bool = True) -> Checkpoint:
    """Load checkpoint ``step`` (default: the one ``root/latest`` names) after validating it.

    ``rank``: also load that rank's payload; it must be below the saving world size
    (at another layout, load the shared part only and rebuild the per-rank state).
    Tensors come back on the CPU. Missing or corrupt files raise CheckpointError
    naming the file.
    """
    root = Path(root)
    if step is None:
        step = latest_step(root)
        if step is None:
            found = list_steps(root)
            raise CheckpointError(f"{root / LATEST} is missing: no complete checkpoint in {root}"
                                  + (f" (step directories without a marker: {found})" if found else ""))
    path = step_dir(root, step)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist (available: {list_steps(root)})")
    manifest = _read_manifest(path)
    if manifest["step"] != step:
        raise CheckpointError(f"{path / MANIFEST} says step {manifest['step']}, expected {step}")
    files, world_size = manifest["files"], manifest["world_size"]
    shared = _load_file(path / SHARED, files[SHARED], weights_only) if SHARED in files else None
    rank_state = None
    if rank is not None:
        if not 0 <= rank < world_size:
            raise CheckpointError(f"{path} was saved by {world_size} ranks; it has no state for rank {rank}")
        rank_state = _load_file(path / rank_file(rank), files.get(rank_file(rank)), weights_only)
    collective = [name for name in files if name.startswith(COLLECTIVE_DIR + "/")]
    for name in collective:
        _check_file(path / name, files[name])
    return Checkpoint(step, path, world_size, shared, rank_state, path / COLLECTIVE_DIR if collective else None)


def training_payloads(*, step: int, adapters: dict, scheduler_state, sampler_state: dict, base: dict,
                      layout: dict, config: dict | None = None, optimizer_state=None) -> tuple:
    """(shared_payload, rank_payload) in the layout the training loop saves and resumes from.

    shared (rank 0's is written): ``step``, ``adapters`` (full tensors with global
    names, e.g. ``adapter_state_dict(model)``, moved to the CPU), ``scheduler``,
    ``data`` (the sampler's state dict), ``base`` (a reference such as
    ``{"checkpoint": DIR}``), ``layout`` and ``config``. rank: ``optimizer`` (a
    per-rank optimizer state, e.g. a plain torch optimizer's; the training loop saves
    its optimizer through ``collective`` instead), ``rng`` (``capture_rng_state()``)
    and ``layout``; the per-rank state only
    applies at the same ``layout`` (e.g. ``{"tp":, "pp":, "ep":, "dp":}``), which
    the loop compares before loading it.
    """
    shared = {"step": step, "adapters": {k: v.detach().cpu() for k, v in adapters.items()},
              "scheduler": scheduler_state, "data": dict(sampler_state), "base": dict(base),
              "layout": dict(layout), "config": config}
    rank_payload = {"optimizer": optimizer_state, "rng": capture_rng_state(), "layout": dict(layout)}
    return shared, rank_payload


def capture_rng_state() -> dict:
    """RNG states of this process: torch CPU, CUDA (this rank's current device only) if
    initialised, python, numpy, and Megatron's model-parallel tracker when it is initialised."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"bit_generator": numpy_state["bit_generator"],
                  "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # Only this rank's device: every rank sees all GPUs of its node, and saving (then
        # restoring) the others' generators would store N copies and touch devices it does not own.
        state["torch_cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        state["megatron_tracker"] = tracker.get_states()
    return state


def restore_rng_state(state: dict):
    """Inverse of ``capture_rng_state`` (CUDA and tracker states only where present and usable)."""
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": numpy_state["bit_generator"],
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_state, device = state["torch_cuda"], torch.cuda.current_device()
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints: one state per visible device
            cuda_state = cuda_state[device] if device < len(cuda_state) else None
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    if "megatron_tracker" in state:
        tracker = _megatron_rng_tracker()
        if tracker is None:
            raise CheckpointError("the checkpoint holds Megatron RNG tracker states but the tracker is not "
                                  "initialised here (call init_distributed before restoring)")
        tracker.set_states(state["megatron_tracker"])


def _as_tuples(value):
    """random.setstate needs tuples; a round trip through some serialisers gives lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _megatron_rng_tracker():
    if "megatron.core.tensor_parallel" not in sys.modules:  # no tracker can exist; skip a slow import
        return None
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return tracker if getattr(tracker, "states_", None) else None
