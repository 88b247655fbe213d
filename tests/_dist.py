"""Run a test body in N gloo processes on this machine.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with
the torchrun environment set (loopback, a free port), calls ``fn(*args)`` in each,
and returns the per-rank results in rank order. A failure in any rank raises here
with that rank's traceback; a rank that does not finish within ``timeout`` seconds
fails the run (and every process is killed). ``fn`` must be a top-level function of
an importable module (it is pickled by name).

Processes are started with one intra-op thread each: the CI machine has 2 cores. They are
forked from a fork server that imported torch, Megatron-core, transformers and this package once
per test session (``PRELOAD``): importing them costs ~7 s of CPU per process, which a spawned
process paid on every launch (about half of the suite's time on 2 cores). A forked child starts
from a process that only imported modules: no threads, no process group, no runtime patches.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback


PRELOAD = [
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.dist_checkpointing",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.models.mixtral.modeling_mixtral",
    "megatron_mole",
    "megatron_mole.checkpoint",
    "megatron_mole.training",
    "megatron_mole.hf",
]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the fork server starts (first launch)
    return ctx


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, results, env, logs):
    # A forked child starts with the fork server's environment and output files: take the
    # launching test's environment, and write output to files the launcher replays into the
    # test's own stdout/stderr (where pytest captures it).
    os.environ.clear()
    os.environ.update(env)
    # Its own process group, so that the launcher can end whatever it leaves behind (a rank that
    # dies mid-save orphans Megatron 0.19's checkpoint-writer Manager, which holds our pipes).
    os.setpgrp()
    for fd, path in zip((1, 2), logs):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, fd)
        os.close(out)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import warnings

    import torch

    torch.set_num_threads(1)
    # Megatron warns about missing apex/TE and CUDA settings in every rank.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        value = fn(*args)
        results.put((rank, True, value))
    except BaseException:  # report everything, including SystemExit from a CLI
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_mole import runtime

            runtime.shutdown()
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()


def _replay(logs):
    for rank_logs in logs:
        for stream, path in zip((sys.stdout, sys.stderr), rank_logs):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    stream.write(f.read())
    sys.stdout.flush()
    sys.stderr.flush()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    ctx = _context()
    results = ctx.Queue()
    port = _free_port()
    log_dir = tempfile.mkdtemp(prefix="run_distributed_")
    logs = [(os.path.join(log_dir, f"{rank}.out"), os.path.join(log_dir, f"{rank}.err")) for rank in range(world_size)]
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, args, results, env, logs[rank]), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                if dead:
                    raise RuntimeError(
                        f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}"
                    )
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            outcome[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(outcome) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # orphans of the rank, if any
            except (ProcessLookupError, PermissionError):
                pass
        _replay(logs)
        shutil.rmtree(log_dir, ignore_errors=True)
    return [outcome[r] for r in range(world_size)]
