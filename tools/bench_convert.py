"""Time and memory of `convert` with 1, 2 and 4 processes against a plain copy of the bytes.

    PYTHONPATH=. python tools/bench_convert.py --work /tmp/bench_convert [--layers 8 --hidden 1024]

Builds a random Llama locally (default ~540 MB in fp32, safetensors shards of 1 GB max as
transformers writes them), times a plain copy of its weight files twice over a hot page cache:
as ``cp`` does (written to the page cache only) and durably (each file fsync'd, as Megatron's
torch_dist writer does with every file it writes), then
runs ``hf-to-mcore`` and ``mcore-to-hf`` under ``torchrun --nproc-per-node N`` for each N.
Each rank reports the seconds its conversion call took, its peak RSS (``ru_maxrss``: the
whole process, imports included) and its RSS just before the call; the table prints the
slowest rank, the largest peak, and the peak above that baseline. The round trip is
checked bit for bit against the source files. Output: one markdown table (README).
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


def worker(direction: str, src: str, dst: str, report: str) -> None:
    """One torchrun rank: convert, then append this rank's numbers to ``report``."""
    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from megatron_mole.checkpoint.mcore import conversion_runtime

    info = conversion_runtime()
    import torch.distributed as dist
    from megatron.core import dist_checkpointing  # noqa: F401  (imports are start-up, not conversion:
    import transformers  # noqa: F401                 # imported before the time and memory baselines)

    dist.barrier()
    base = _rss()
    start = time.perf_counter()
    (hf_to_mcore if direction == "hf-to-mcore" else mcore_to_hf)(src, dst)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    line = json.dumps({"rank": info.rank, "seconds": seconds, "peak": peak, "base": base})
    with open(report, "a") as f:
        f.write(line + "\n")


def _build(directory: str, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    import torch
    import transformers

    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                                      vocab_size=vocab, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))


def _copy_seconds(src: str, dst: str, durable: bool = False) -> float:
    os.makedirs(dst, exist_ok=True)
    start = time.perf_counter()
    for name in sorted(os.listdir(src)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            if durable:
                with open(os.path.join(dst, name), "rb+") as f:
                    os.fsync(f.fileno())
    return time.perf_counter() - start


def _launch(n: int, direction: str, src: str, dst: str, report: str) -> list:
    if os.path.exists(report):
        os.remove(report)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["torchrun", "--standalone", f"--nproc-per-node={n}", os.path.abspath(__file__), "--worker", direction,
           src, dst, report]
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
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    hf = os.path.join(args.work, "hf")
    size = _build(hf, args.layers, args.hidden, args.ffn, args.vocab)
    _copy_seconds(hf, os.path.join(args.work, "warm"))  # page cache hot for every run below
    copy = min(_copy_seconds(hf, os.path.join(args.work, f"copy{i}")) for i in range(2))
    durable = min(_copy_seconds(hf, os.path.join(args.work, f"dcopy{i}"), durable=True) for i in range(2))
    mb = size / 2**20
    print(f"model: {args.layers} layers, hidden {args.hidden}, {mb:.0f} MB fp32; plain copy {copy:.2f} s "
          f"({mb / copy:.0f} MB/s), fsync'd copy {durable:.2f} s ({mb / durable:.0f} MB/s)\n")
    print("| direction | processes | time (s) | x copy | x fsync'd copy | peak RSS per rank (MB) "
          "| peak above start (MB) | round trip |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(p) for p in args.procs.split(",")]:
        mcore, back = os.path.join(args.work, f"mcore{n}"), os.path.join(args.work, f"back{n}")
        for direction, src, dst in (("hf-to-mcore", hf, mcore), ("mcore-to-hf", mcore, back)):
            ranks = _launch(n, direction, src, dst, os.path.join(args.work, f"report{n}.jsonl"))
            seconds = max(r["seconds"] for r in ranks)
            peak = max(r["peak"] for r in ranks) / 2**20
            above = max(r["peak"] - r["base"] for r in ranks) / 2**20
            exact = _same_files(hf, back) if direction == "mcore-to-hf" else ""
            print(f"| {direction} | {n} | {seconds:.2f} | {seconds / copy:.1f} | {seconds / durable:.1f} "
                  f"| {peak:.0f} | {above:.0f} | {exact} |")
        shutil.rmtree(mcore)
        shutil.rmtree(back)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
    else:
        main()
