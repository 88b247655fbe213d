"""``megatron-mole bench``: a small dispatcher over sub-benchmarks.

Each sub-benchmark is a module of this folder exposing ``add_arguments(parser)``
and ``run(args)``; a new one only needs an entry in ``BENCHMARKS``. Every entry is
offered; a listed module that is missing is an error naming it (never hidden).
"""
import importlib

from megatron_mole.errors import MoleError

BENCHMARKS = {
    "layer": ("tools.bench_layer", "MLP fwd+bwd cost: frozen base, LoRA, MoLE, naive loop"),
    "model": ("tools.bench_model", "whole-model step time and peak memory: base, LoRA, MoLE; local vs sdpa; recompute"),
    "dispatch": ("tools.bench_dispatch", "expert-parallel vs replicated experts: bytes and step time"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        _load(module).add_arguments(sub.add_parser(name, help=help_text))


def run(args):
    return _load(BENCHMARKS[args.benchmark][0]).run(args)


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise  # the module exists; something it imports is missing
        raise MoleError(f"benchmark module {module} is missing from this checkout's tools/") from None
