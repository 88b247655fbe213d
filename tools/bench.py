"""``megatron-mole bench``: a small dispatcher over sub-benchmarks.

Each sub-benchmark is a module of this folder exposing ``add_arguments(parser)``
and ``run(args)``; a new one only needs an entry in ``BENCHMARKS``. Every entry is
offered; a listed module that is missing fails with an ImportError naming it
(never silently hidden).
"""
import importlib

BENCHMARKS = {
    "layer": ("tools.bench_layer", "MLP fwd+bwd cost: frozen base, LoRA, MoLE, naive loop"),
    "dispatch": ("tools.bench_dispatch", "expert-parallel vs replicated experts: bytes and step time"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))


def run(args):
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
