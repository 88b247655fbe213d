"""``megatron-mole bench``: a small dispatcher over sub-benchmarks.

Each sub-benchmark is a module exposing ``add_arguments(parser)`` and
``run(args)``; a module that is not present is not offered, so a new one only
needs an entry in ``BENCHMARKS``.
"""
import importlib
import importlib.util

BENCHMARKS = {
    "layer": ("megatron_mole.layers.bench", "MLP fwd+bwd cost: frozen base, LoRA, MoLE, naive loop"),
    "dispatch": ("megatron_mole.layers.bench_dispatch", "expert-parallel vs replicated experts: bytes and step time"),
}


def _available():
    for name, (module, help_text) in BENCHMARKS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                yield name, module, help_text
        except ModuleNotFoundError:
            pass


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, module, help_text in _available():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))


def run(args):
    module = dict((n, m) for n, m, _ in _available())[args.benchmark]
    return importlib.import_module(module).run(args)
