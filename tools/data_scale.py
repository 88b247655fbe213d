"""Measure the two data paths at scale: preprocess throughput, and per-rank data start-up of `train`.

    PYTHONPATH=. python tools/data_scale.py --work /tmp/scale --sizes 10000 100000 1000000 \\
        [--jsonl-max 100000] [--workers 1 2]

Generates synthetic instruction JSONL (``training.synthetic``, streamed, ~150 bytes a line)
and a tokenizer, preprocesses each size (``megatron-mole preprocess``, timed per worker
count), then for each path starts a fresh Python process per measurement that does what a
rank of ``train`` does with the data before its first step: ``loop.build_dataset`` (JSONL:
read and tokenise everything; prefix: memory-map and build the index arrays) and the first
global batch of the domain-mixing loader. It reports that wall time and the process's peak
RSS (``VmHWM``) next to the same process's RSS right after the imports (``base``), so
the difference is what the data costs. Sizes above ``--jsonl-max`` skip the JSONL path
(it is reported as not measured); with ``--replicate K`` their prefix is the size-K prefix
repeated (tokenising 1M examples takes ~40 min on 2 busy cores; start-up does not depend on the text). Prints one JSON line per measurement and a Markdown table.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from megatron_mole.training import loop, sampler, train_config, indexed, data
import megatron.core.datasets.indexed_dataset
from transformers import AutoTokenizer  # train has imported it before it builds the data
def rss():  # VmHWM, not ru_maxrss: ru_maxrss survives exec and would include the parent's peak
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024
base = rss()
cfg = train_config.config_from_dict(json.loads(sys.argv[1]))
start = time.perf_counter()
dataset = loop.build_dataset(cfg)
batch = sampler.GlobalBatchLoader(dataset, 8, seed=1, packing=True).next_global_batch()
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": rss(), "base_rss_mb": base,
                  "examples": sum(dataset.domain_sizes().values())}))
"""


def write_jsonl(path: Path, n: int, seed: int = 0):
    from megatron_mole.training.synthetic import DOMAINS, make_example

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            domain = rng.choice(DOMAINS)
            prompt, response = make_example(domain, rng)
            handle.write(json.dumps({"domain": domain, "messages": [{"role": "user", "content": prompt},
                                                                    {"role": "assistant", "content": response}]}) + "\n")


def replicate(source: Path, out: Path, times: int):
    """``out``: the prefix ``source`` repeated ``times`` times (Megatron's IndexedDatasetBuilder.add_index)."""
    import shutil

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_mole.training import indexed as I

    meta = json.loads((source / I.META).read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name, dtype in ((I.TOKENS, np.dtype(meta["token_dtype"]).type), (I.SPANS, np.int32)):
        builder = IndexedDatasetBuilder(str(out / f"{name}.bin"), dtype=dtype)
        for _ in range(times):
            builder.add_index(str(source / name))
        builder.finalize(str(out / f"{name}.idx"))
    np.save(out / I.EXAMPLES, np.concatenate([np.load(source / I.EXAMPLES)] * times))
    (out / I.BAD_LINES).write_text("")
    meta.update(num_examples=meta["num_examples"] * times, num_lines=meta["num_lines"] * times,
                domain_counts={d: c * times for d, c in meta["domain_counts"].items()})
    (out / I.META).write_text(json.dumps(meta))


def child(config: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--jsonl-max", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--preprocess-workers", type=int, default=2, help="workers for sizes not timed per count")
    parser.add_argument("--replicate", type=int, default=0,
                        help="sizes above --jsonl-max: repeat the prefix of this size instead of tokenising")
    parser.add_argument("--reuse", action="store_true", help="keep prefixes already built (except the timed size)")
    parser.add_argument("--throughput-size", type=int, default=100_000, help="size timed with each --workers")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from megatron_mole.training.preprocess import preprocess
    from megatron_mole.training.synthetic import generate_records, record_texts
    from megatron_mole.training.tokenizer import train_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer(record_texts(generate_records(256)), tok, vocab_size=512)
    results = []
    for n in args.sizes:
        path = work / f"data_{n}.jsonl"
        source = args.replicate and n > args.jsonl_max and work / f"prefix_{args.replicate}"
        if source:  # a copy of a smaller prefix, repeated: start-up does not depend on the text
            replicate(source, work / f"prefix_{n}", n // args.replicate)
        elif not path.is_file():
            write_jsonl(path, n)
        counts = [] if source else args.workers if n == args.throughput_size else [args.preprocess_workers]
        if args.reuse and n != args.throughput_size and (work / f"prefix_{n}" / "meta.json").is_file():
            counts = []
        for workers in counts:
            start = time.perf_counter()
            preprocess([path], tok, work / f"prefix_{n}", workers=workers, force=True)
            seconds = time.perf_counter() - start
            results.append({"what": "preprocess", "examples": n, "workers": workers, "seconds": seconds,
                            "examples_per_s": n / seconds, "mb": path.stat().st_size / 2**20})
            print(json.dumps(results[-1]), flush=True)
        for kind in ("jsonl", "prefix"):
            if kind == "jsonl" and n > args.jsonl_max:
                continue
            data = {"paths": [str(path)]} if kind == "jsonl" else {"prefix": [str(work / f"prefix_{n}")]}
            config = {"base": {"checkpoint": str(tok), "tokenizer": str(tok)},
                      "data": dict(data, seq_length=128, packing=True)}
            results.append(dict(child(config), what="startup", path=kind, size=n))
            print(json.dumps(results[-1]), flush=True)
    print("\n| examples | path | data start-up (s) | peak RSS (MiB) | RSS after imports (MiB) |\n|---|---|---|---|---|")
    for r in results:
        if r["what"] == "startup":
            print(f"| {r['size']:,} | {r['path']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['base_rss_mb']:.0f} |")
    print("\n| examples | workers | preprocess (s) | examples/s |\n|---|---|---|---|")
    for r in results:
        if r["what"] == "preprocess":
            print(f"| {r['examples']:,} | {r['workers']} | {r['seconds']:.1f} | {r['examples_per_s']:.0f} |")


if __name__ == "__main__":
    main()
