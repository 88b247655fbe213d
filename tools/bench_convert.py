"""Time and memory of `convert` with 1, 2 and 4 processes against a copy of the same bytes,
with the page cache hot and cold, and the fixed start-up costs apart from the per-byte ones.

    PYTHONPATH=. python tools/bench_convert.py --work /tmp/bench_convert [--layers 8 --hidden 1024]

Builds a random Llama locally (default ~485 MB in fp32, safetensors shards of 1 GB max as
transformers writes them) and a tiny one (1 layer, hidden 64). Baselines, each the best of
two: a plain copy of the weight files (``shutil.copyfile``: written to the page cache only),
a durable copy (each file fsync'd, as Megatron's torch_dist writer does with every file it
writes) and a cold durable copy: the source files' pages dropped from the page cache first
(``posix_fadvise(DONTNEED)``, no root needed), so the bytes come from the disk.

Then, for each N, one ``torchrun --nproc-per-node N`` launch per direction in which every
rank reports:

* start-up: seconds from its process start to the conversion (interpreter, torch, Megatron,
  the process group), not part of any conversion time below;
* fixed: the conversion of the tiny model (config, model template, checkpoint writer
  start, metadata: the costs that do not grow with the model; it also pays the lazy imports
  a first conversion makes);
* hot: the model again, its source in the page cache (the better of two runs, one before
  and one after the cold run);
* cold: once more after dropping the source files' pages (written ones were fsync'd by the
  writer; ``mcore-to-hf`` reads the ``hot`` run's torch_dist files).

Times are the slowest rank's; "hot CPU" is that rank's user + system CPU seconds in the hot
run (its forked writer workers included), which the load of a shared machine inflates less
than wall time. RSS is the largest rank's (``ru_maxrss``, imports included), "above start"
its peak minus its RSS just before the first conversion. ``--repeat R`` launches each cell
R times and keeps the best of each number. The round trip is checked bit for bit against
the source. Output: one markdown table (README).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _process_age() -> float:
    """Seconds since this process started (from /proc, clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (0.16's writer
    workers are forked processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def drop_cache(directory: str) -> None:
    """Evict every file under ``directory`` from the page cache (fsync first: dirty pages stay)."""
    for base, _, names in os.walk(directory):
        for name in names:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def worker(direction: str, tiny_src: str, src: str, dst: str, report: str) -> None:
    """One torchrun rank: tiny conversion (fixed costs), hot, cold; append its numbers to ``report``."""
    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_mole.checkpoint.mcore import conversion_runtime

    info = conversion_runtime()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing  # noqa: F401  (start-up, not conversion)

    convert = hf_to_mcore if direction == "hf-to-mcore" else mcore_to_hf
    dist.barrier()
    numbers = {"rank": info.rank, "startup": _process_age(), "base": _rss()}
    for tag, source, target in (("fixed", tiny_src, dst + "-tiny"), ("hot", src, dst),
                                ("cold", src, dst + "-cold"), ("hot2", src, dst + "-hot2")):
        if tag == "cold" and info.rank == 0:
            drop_cache(src)
        dist.barrier()
        start, cpu = time.perf_counter(), _cpu_seconds()
        convert(source, target)
        numbers[tag] = time.perf_counter() - start
        numbers[tag + "_cpu"] = _cpu_seconds() - cpu
        dist.barrier()
        if tag == "hot2" and info.rank == 0:
            shutil.rmtree(target)
    numbers["hot"] = min(numbers["hot"], numbers.pop("hot2"))
    numbers["hot_cpu"] = min(numbers["hot_cpu"], numbers.pop("hot2_cpu"))
    numbers["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(report, "a") as f:
        f.write(json.dumps(numbers) + "\n")


def _build(directory: str, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 128),
                                      vocab_size=vocab, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))


def _copy_seconds(src: str, dst: str, durable: bool = False, cold: bool = False) -> float:
    os.makedirs(dst, exist_ok=True)
    if cold:
        drop_cache(src)
    start = time.perf_counter()
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            if durable:
                with open(os.path.join(dst, name), "rb+") as f:
                    os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


def _launch(n: int, direction: str, tiny: str, src: str, dst: str, report: str) -> list:
    if os.path.exists(report):
        os.remove(report)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={n}", os.path.abspath(__file__), "--worker", direction,
           tiny, src, dst, report]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(report) as f:
        return [json.loads(line) for line in f]


def _same_files(a: str, b: str) -> bool:
    import filecmp

    names = sorted(n for n in os.listdir(a) if n.endswith((".safetensors", ".json")))
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench_convert")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--repeat", type=int, default=1, help="launches per cell; the table keeps the best")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    hf, tiny = os.path.join(args.work, "hf"), os.path.join(args.work, "tiny")
    size = _build(hf, args.layers, args.hidden, args.ffn, args.vocab)
    _build(tiny, 1, 64, 128, 256)
    mcore_tiny = os.path.join(args.work, "mcore-tiny")
    subprocess.run([sys.executable, "-m", "megatron_mole", "convert", "hf-to-mcore", "--hf", tiny, "--out", mcore_tiny],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    _copy_seconds(hf, os.path.join(args.work, "warm"))  # page cache hot for the hot baselines
    copy = min(_copy_seconds(hf, os.path.join(args.work, "copy")) for _ in range(2))
    durable = min(_copy_seconds(hf, os.path.join(args.work, "dcopy"), durable=True) for _ in range(2))
    cold = min(_copy_seconds(hf, os.path.join(args.work, "ccopy"), durable=True, cold=True) for _ in range(2))
    mb = size / 2**20
    print(f"model: {args.layers} layers, hidden {args.hidden}, {mb:.0f} MB fp32; plain copy {copy:.2f} s "
          f"({mb / copy:.0f} MB/s), fsync'd copy {durable:.2f} s ({mb / durable:.0f} MB/s), "
          f"cold fsync'd copy {cold:.2f} s ({mb / cold:.0f} MB/s)\n")
    print("| direction | processes | start-up (s) | fixed (s) | hot (s) | hot CPU (s) | × copy | × fsync'd copy "
          "| cold (s) | × cold fsync'd copy | peak RSS per rank (MB) | peak above start (MB) | round trip |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in [int(p) for p in args.procs.split(",")]:
        mcore, back = os.path.join(args.work, f"mcore{n}"), os.path.join(args.work, f"back{n}")
        for direction, src, dst, small in (("hf-to-mcore", hf, mcore, tiny), ("mcore-to-hf", mcore, back, mcore_tiny)):
            runs = []
            for _ in range(args.repeat):
                for path in (dst, dst + "-cold", dst + "-tiny"):  # this direction's outputs only
                    shutil.rmtree(path, ignore_errors=True)
                runs.append(_launch(n, direction, small, src, dst, os.path.join(args.work, f"report{n}.jsonl")))
            # per launch the slowest rank; over repeated launches the best (the machine is shared)
            worst = {key: min(max(r[key] for r in ranks) for ranks in runs)
                     for key in ("startup", "fixed", "hot", "cold", "hot_cpu")}
            peak = min(max(r["peak"] for r in ranks) for ranks in runs) / 2**20
            above = min(max(r["peak"] - r["base"] for r in ranks) for ranks in runs) / 2**20
            exact = ""
            if direction == "mcore-to-hf":
                exact = "bit-exact" if _same_files(hf, back) and _same_files(hf, back + "-cold") else "DIFFERS"
            print(f"| {direction} | {n} | {worst['startup']:.1f} | {worst['fixed']:.2f} | {worst['hot']:.2f} "
                  f"| {worst['hot_cpu']:.2f} | {worst['hot'] / copy:.1f} | {worst['hot'] / durable:.1f} | {worst['cold']:.2f} "
                  f"| {worst['cold'] / cold:.1f} | {peak:.0f} | {above:.0f} | {exact} |", flush=True)
        for path in (mcore, back, mcore + "-cold", back + "-cold", mcore + "-tiny", back + "-tiny"):
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:7])
    else:
        main()
