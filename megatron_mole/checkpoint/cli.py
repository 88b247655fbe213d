"""`megatron-mole convert hf-to-mcore | mcore-to-hf`: base checkpoint conversion.

Runs in one CPU process, or under ``torchrun --nproc-per-node N`` where each process
converts and writes its share of the tensors (same output; rank 0 prints). Errors about the input (a missing or
truncated shard, a tensor of the wrong shape, an unknown architecture, an existing
output directory) are printed as one line naming the file or tensor, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from megatron_mole.checkpoint.hf_io import CheckpointError
from megatron_mole.checkpoint.spec import UnsupportedModelError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face directory -> Megatron-core distributed checkpoint")
    to_mcore.add_argument("--hf", required=True, help="Hugging Face model directory (safetensors)")
    to_mcore.add_argument("--out", required=True, help="output directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="TP size the vocabulary is padded for (and sizes checked)")
    to_mcore.add_argument("--pp", type=int, default=1, help="PP size the layer count is checked against")
    to_mcore.add_argument("--ep", type=int, default=1, help="EP size the expert count is checked against")
    to_mcore.add_argument("--dtype", default=None, help="Megatron parameter dtype (default: the checkpoint's)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128, dest="vocab_divisor",
                          help="pad the vocabulary to a multiple of this times --tp (Megatron-LM's default 128)")
    to_mcore.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    to_hf = sub.add_parser("mcore-to-hf", help="converted Megatron-core checkpoint -> Hugging Face directory")
    to_hf.add_argument("--mcore", required=True, help="directory written by hf-to-mcore")
    to_hf.add_argument("--out", required=True, help="output directory")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    from megatron_mole.checkpoint.convert import hf_to_mcore, mcore_to_hf

    start = time.perf_counter()
    try:
        if args.direction == "hf-to-mcore":
            spec = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
                               overwrite=args.overwrite, vocab_divisor=args.vocab_divisor)
        else:
            spec = mcore_to_hf(args.mcore, args.out, overwrite=args.overwrite)
    except (CheckpointError, UnsupportedModelError, FileExistsError, ValueError) as err:
        print(f"megatron-mole convert {args.direction}: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{args.direction}: {spec['architecture']} ({spec['params_dtype']}, "
          f"{spec['transformer']['num_layers']} layers) -> {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
