"""`megatron-mole train`: fine-tune MoLE adapters on a converted base, in every rank of a torchrun job.

    torchrun --nproc-per-node 8 -m megatron_mole train --config job.yaml \\
        [--max-steps N] [--save DIR] [--save-interval N] [--load DIR] [--load-step N] \\
        [--log-jsonl FILE] [--strict] [--set KEY=VALUE ...]

The base decides the model family (training/family.py): a converted LLaVA base trains on image
instruction JSONL with its ``multimodal`` section (projector, Parrot; training/llava_family.py).
The YAML schema is ``megatron_mole.training.train_config``; the flags override it
(``--set`` any entry, e.g. ``--set parallel.ep=2``). A bad config (an unknown key, a
wrong type, sizes that do not fit the world), unusable data, a missing file or a bad
checkpoint is reported as one line naming the key, the file (and line) or the tensor,
exit status 2.
"""
import sys

from megatron_mole.training.train_config import add_config_arguments

__all__ = ["add_arguments", "run"]


def add_arguments(parser):
    add_config_arguments(parser)
    parser.add_argument("--strict", action="store_true", help="a bad data line is an error (sets data.strict)")


def run(args) -> int:
    from megatron_mole.errors import MoleError
    from megatron_mole.training.train_config import config_from_args

    try:
        if args.strict:
            args.assignments = list(args.assignments) + ["data.strict=true"]
        cfg = config_from_args(args)
        from megatron_mole.training.loop import train

        result = train(cfg)
    except (MoleError, OSError) as error:  # config, data, checkpoint errors; a missing file
        print(f"megatron-mole train: error: {error}", file=sys.stderr, flush=True)
        return 2
    if result.records and _is_rank0():
        last = result.records[-1]
        print(f"train: steps {result.start_step}->{result.final_step}, last loss {last['loss']:.4f}, "
              f"{last['tokens_per_s']:.0f} tokens/s" + (f", saved {result.last_checkpoint}"
                                                         if result.last_checkpoint else ""), flush=True)
    return 0


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
