"""The `megatron-mole` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them. A subcommand whose module is not
present is simply not offered, so ``megatron-mole --help`` lists what exists.
Modules are imported only for the subcommand that runs (Megatron-core's import
costs seconds).
"""
import argparse
import importlib
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent

# name -> (module, one-line help)
SUBCOMMANDS = {
    "smoke": ("megatron_mole.runtime.smoke", "CPU/GPU smoke run of a tiny Megatron GPT (forward+backward)"),
    "convert": ("megatron_mole.checkpoint.cli", "convert base checkpoints Hugging Face <-> Megatron-core"),
    "verify": ("megatron_mole.checkpoint.verify", "compare Megatron and transformers logits (fp32)"),
    "export": ("megatron_mole.checkpoint.export_cli", "export trained adapters for Hugging Face"),
    "preprocess": ("megatron_mole.training.preprocess", "tokenise instruction data once into an indexed dataset"),
    "train": ("megatron_mole.training.cli", "fine-tune MoLE adapters (run under torchrun)"),
    "quickstart": ("megatron_mole.training.quickstart", "tiny end-to-end run on CPU: build, convert, train, export"),
    "bench": ("megatron_mole.bench", "benchmarks: layer cost, dispatch cost"),
    "memory": ("megatron_mole.training.memory", "expected memory per GPU of a training config"),
    "analyze": ("megatron_mole.analysis.cli", "router statistics of a trained adapter"),
}


def _module_exists(module: str) -> bool:
    # A file check, not find_spec: find_spec imports the parent packages (torch).
    rel = Path(*module.split(".")[1:])
    return (_ROOT / rel.with_suffix(".py")).is_file() or (_ROOT / rel / "__init__.py").is_file()


def _available():
    for name, (module, help_text) in SUBCOMMANDS.items():
        if _module_exists(module):
            yield name, module, help_text


def build_parser():
    parser = argparse.ArgumentParser(prog="megatron-mole", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in _available():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        args = parser.parse_args(argv)
        parser.print_help()
        return 0
    name = argv[0]
    commands = {n: m for n, m, _ in _available()}
    if name not in commands:
        parser.error(f"unknown command {name!r}; choose from {', '.join(commands)}")
    module = importlib.import_module(commands[name])
    sub = argparse.ArgumentParser(prog=f"megatron-mole {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(argv[1:])) or 0)
