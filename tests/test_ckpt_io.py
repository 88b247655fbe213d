"""Atomic checkpoint IO: round trips, keep-last, several ranks (threads with a barrier),
corrupt or missing files, saves killed at each phase in a subprocess, RNG states."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from megatron_mole.checkpoint import ckpt_io as C


def _shared(step):
    return {"adapters": {"decoder.layers.0.mlp.linear_fc1.lora_a": torch.full((2, 3), float(step))},
            "scheduler": {"last_step": step}, "data": {"position": 10 * step}, "base": {"path": "/base"}}


def _rank(step, rank=0):
    return {"optimizer": {"state": {0: {"exp_avg": torch.arange(4.0) + step + rank}}, "param_groups": [{"lr": 0.1}]}}


def _assert_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip_latest_and_files(tmp_path):
    path = C.save_checkpoint(tmp_path, 3, _rank(3), shared_payload=_shared(3))
    assert path == tmp_path / "step_3"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank_00000.pt", "shared.pt"]
    assert (tmp_path / "latest").read_text() == "step_3\n"
    C.save_checkpoint(tmp_path, 5, _rank(5), shared_payload=_shared(5))
    loaded = C.load_checkpoint(tmp_path, rank=0)
    assert (loaded.step, loaded.world_size) == (5, 1)
    _assert_equal(loaded.shared, _shared(5))
    _assert_equal(loaded.rank_state, _rank(5))
    older = C.load_checkpoint(tmp_path, step=3)
    _assert_equal(older.shared, _shared(3))
    assert older.rank_state is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_3", "step_5"]


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        C.save_checkpoint(tmp_path, step, _rank(step), shared_payload=_shared(step), keep_last=2)
    assert C.list_steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_4", "step_5"]


def _save_as_ranks(root, step, world):
    """Every rank of a ``world`` saves ``step``, one thread per rank; returns the errors raised."""
    barrier = threading.Barrier(world, timeout=30)
    errors = []

    def rank_main(rank):
        try:
            C.save_checkpoint(root, step, _rank(step, rank), shared_payload=_shared(step) if rank == 0 else {"x": 1},
                              rank=rank, world_size=world, barrier=barrier.wait, keep_last=1)
        except BaseException as error:  # noqa: BLE001 - returned to the test
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_several_ranks_write_their_own_files(tmp_path):
    world = 3
    assert _save_as_ranks(tmp_path, 7, world) == []
    for rank in range(world):
        loaded = C.load_checkpoint(tmp_path, rank=rank)
        assert loaded.world_size == world
        _assert_equal(loaded.rank_state, _rank(7, rank))
        _assert_equal(loaded.shared, _shared(7))
    with pytest.raises(C.CheckpointError, match="saved by 3 ranks; it has no state for rank 3"):
        C.load_checkpoint(tmp_path, rank=3)
    # Refusing to overwrite the latest happens on every rank before any barrier: no rank is left waiting.
    errors = _save_as_ranks(tmp_path, 7, world)
    assert len(errors) == world and all(isinstance(e, C.CheckpointError) for e in errors), errors


def test_one_checkpoint_error_class():
    # the training checkpoint, the HF reader and errors.py share one class (a ValueError, no longer a RuntimeError)
    from megatron_mole import errors
    from megatron_mole.checkpoint import hf_io

    assert C.CheckpointError is hf_io.CheckpointError is errors.CheckpointError
    assert issubclass(C.CheckpointError, errors.MoleError) and issubclass(C.CheckpointError, ValueError)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(C.CheckpointError, match=f"{tmp_path}/latest is missing: no complete checkpoint"):
        C.load_checkpoint(tmp_path)
    path = C.save_checkpoint(tmp_path, 1, _rank(1), shared_payload=_shared(1))
    with pytest.raises(C.CheckpointError, match=r"step_2 does not exist \(available: \[1\]\)"):
        C.load_checkpoint(tmp_path, step=2)

    data = (path / "rank_00000.pt").read_bytes()
    (path / "rank_00000.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(C.CheckpointError, match=f"{path}/rank_00000.pt is corrupt: {len(data) // 2} bytes"):
        C.load_checkpoint(tmp_path, rank=0)
    (path / "rank_00000.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(C.CheckpointError, match="rank_00000.pt is corrupt: sha256 differs"):
        C.load_checkpoint(tmp_path, rank=0)
    (path / "shared.pt").unlink()
    with pytest.raises(C.CheckpointError, match=f"{path}/shared.pt is missing"):
        C.load_checkpoint(tmp_path)
    (path / "manifest.json").write_text("{ nope")
    with pytest.raises(C.CheckpointError, match=f"{path}/manifest.json is corrupt"):
        C.load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("garbage")
    with pytest.raises(C.CheckpointError, match="latest: expected 'step_N', found 'garbage'"):
        C.load_checkpoint(tmp_path)


def test_bad_save_arguments_and_overwrite_refused(tmp_path):
    with pytest.raises(ValueError, match="world_size=2 needs a barrier"):
        C.save_checkpoint(tmp_path, 1, {}, world_size=2, rank=1)
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        C.save_checkpoint(tmp_path, 1, {}, keep_last=0)
    C.save_checkpoint(tmp_path, 4, _rank(4))
    with pytest.raises(C.CheckpointError, match="step_4 already exists and is not newer than latest"):
        C.save_checkpoint(tmp_path, 4, _rank(4))
    assert C.load_checkpoint(tmp_path, rank=0).step == 4


_CHILD = r"""
import os, shutil, sys, time
import torch
from megatron_mole.checkpoint import ckpt_io as C
from tests.test_ckpt_io import _rank, _shared

root, phase, flag = sys.argv[1:4]
C.save_checkpoint(root, 1, _rank(1), shared_payload=_shared(1), keep_last=1)

def stall(*args, **kwargs):
    open(flag, "w").close()
    time.sleep(600)

if phase == "write":  # half of the rank file is on disk
    def partial(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        stall()
    C._write_durable = partial
elif phase == "marker":  # step_2 renamed into place, 'latest' not yet replaced
    os.replace = stall
elif phase == "prune":  # 'latest' names step_2, step_1 half-way through deletion
    real_rmtree = shutil.rmtree
    shutil.rmtree = lambda path, *a, **k: stall() if ".trash_step_1" in str(path) else real_rmtree(path, *a, **k)
C.save_checkpoint(root, 2, _rank(2), shared_payload=_shared(2), keep_last=1)
"""


KILL_POINTS = [  # phase, the step load_checkpoint must find, what the directory holds at the kill
    ("write", 1, [".tmp_step_2", "latest", "step_1"]),
    ("marker", 1, ["latest", "latest.tmp", "step_1", "step_2"]),
    ("prune", 2, [".trash_step_1", "latest", "step_2"]),
]


@pytest.mark.parametrize("phase, survivor, left", KILL_POINTS)
def test_killed_save_leaves_a_loadable_checkpoint(tmp_path, phase, survivor, left):
    root, flag = tmp_path / "ckpt", tmp_path / "stalled"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), phase, str(flag)], cwd=repo,
                             env={**os.environ, "PYTHONPATH": repo}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never reached the phase"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()

    assert sorted(p.name for p in root.iterdir()) == left  # killed where intended
    loaded = C.load_checkpoint(root, rank=0)
    assert loaded.step == survivor
    _assert_equal(loaded.shared, _shared(survivor))
    _assert_equal(loaded.rank_state, _rank(survivor))
    # The next save (e.g. by the resumed run) cleans up and commits normally.
    if survivor == 1:
        C.save_checkpoint(root, 2, _rank(2), shared_payload=_shared(2), keep_last=1)
    C.save_checkpoint(root, 3, _rank(3), shared_payload=_shared(3), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]
    _assert_equal(C.load_checkpoint(root, step=2, rank=0).rank_state, _rank(2))


def _draws():
    return torch.rand(3), random.random(), np.random.rand(2), np.random.randn()


def test_rng_states_restore_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    C.save_checkpoint(tmp_path, 0, {"rng": C.capture_rng_state()})
    expected = _draws()
    _draws()
    C.restore_rng_state(C.load_checkpoint(tmp_path, rank=0).rank_state["rng"])  # weights_only load
    got = _draws()
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]


def test_cuda_rng_state_is_the_rank_device_only(monkeypatch):
    """Mocked CUDA (4 visible devices, this rank on cuda:2): one generator state is saved and
    restored, that of cuda:2; an older checkpoint's per-device list restores its entry 2."""
    import torch

    def device_state(device):
        return torch.full((4,), device, dtype=torch.uint8)

    def refuse_all(*args, **kwargs):
        raise AssertionError("every device's RNG state was read or written")

    restored = []
    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 4,
                        "current_device": lambda: 2, "get_rng_state": device_state,
                        "get_rng_state_all": refuse_all, "set_rng_state_all": refuse_all,
                        "set_rng_state": lambda state, device: restored.append((state.tolist(), device))}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    state = C.capture_rng_state()
    assert state["torch_cuda"].tolist() == [2, 2, 2, 2]
    C.restore_rng_state(state)
    C.restore_rng_state(dict(state, torch_cuda=[device_state(d) for d in range(4)]))
    assert restored == [([2, 2, 2, 2], 2), ([2, 2, 2, 2], 2)]
