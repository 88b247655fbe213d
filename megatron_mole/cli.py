"""The `megatron-mole` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them (``SUBCOMMANDS``), and ``--help``
lists every one. Modules are imported only for the subcommand that runs
(Megatron-core's import costs seconds).

- ``tools.*`` modules (benchmarks, the smoke run) live in the source checkout's
  ``tools/`` folder next to the package, not in the package: the loader puts the
  checkout's root on ``sys.path`` and imports ``tools.<name>`` as a normal module.
  A normal import, not a load by file path, because ``bench dispatch`` starts
  processes with the spawn method, which pickle functions by module name and
  re-import that module in the child (the child inherits ``sys.path``); the tests
  import the same modules under the same names. A wheel install has no ``tools/``:
  those subcommands are then an error saying so.
- A subcommand whose module is missing is an error (exit 2), never hidden.
- Every user error (``megatron_mole.errors.USER_ERRORS``: any ``MoleError``, a
  missing or existing path) is one line ``megatron-mole <cmd>: error: <message>``
  on stderr, exit 2.
- ``--verbose`` (or ``MEGATRON_MOLE_VERBOSE=1``, which child processes inherit)
  shows Megatron-core's "Apex / Transformer Engine not installed" warnings.
"""
import argparse
import importlib
import sys
from pathlib import Path

import megatron_mole
from megatron_mole.errors import MoleError, run_command

PACKAGE_DIR = Path(megatron_mole.__file__).resolve().parent
TOOLS_DIR = PACKAGE_DIR.parent / "tools"

# name -> (module, one-line help)
SUBCOMMANDS = {
    "smoke": ("tools.smoke", "CPU/GPU smoke run of a tiny Megatron GPT (forward+backward)"),
    "convert": ("megatron_mole.checkpoint.cli", "convert base checkpoints Hugging Face <-> Megatron-core"),
    "factorize": ("megatron_mole.checkpoint.factorize", "FactorLLM: split a dense base's MLPs into routed experts"),
    "verify": ("megatron_mole.checkpoint.verify", "compare Megatron and transformers logits (fp32)"),
    "export": ("megatron_mole.checkpoint.export_cli", "export trained adapters for Hugging Face"),
    "preprocess": ("megatron_mole.training.preprocess", "tokenise instruction data once into an indexed dataset"),
    "train": ("megatron_mole.training.cli", "fine-tune MoLE adapters (run under torchrun)"),
    "quickstart": ("megatron_mole.training.quickstart", "tiny end-to-end run on CPU: build, convert, train, export"),
    "analyze": ("megatron_mole.training.analyze", "which experts each domain uses (stats, plots); Router Lens selection"),
    "bench": ("tools.bench", "benchmarks: layer cost, dispatch cost"),
    "memory": ("megatron_mole.training.memory", "expected memory per GPU of a training config"),
}


class MissingCommandError(MoleError):
    """A listed subcommand's module is not in this installation."""


def _checkout_tools(module: str) -> None:
    """Make ``tools.<name>`` importable from the source checkout, or say why it is not."""
    path = TOOLS_DIR / (module.split(".", 1)[1] + ".py")
    # setup.py marks a source checkout: a wheel's site-packages may hold some other "tools".
    if not path.is_file() or not (TOOLS_DIR.parent / "setup.py").is_file():
        raise MissingCommandError(
            f"needs tools/{path.name}, which lives in a source checkout of megatron_mole and is not part "
            f"of an installed package (looked in {TOOLS_DIR}); clone the repository and "
            f"`pip install -e .` there")
    root = str(TOOLS_DIR.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


def load_command(name: str):
    """The module of subcommand ``name``; MissingCommandError when it is not installed."""
    module_name = SUBCOMMANDS[name][0]
    if module_name.startswith("tools."):
        _checkout_tools(module_name)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name + ".").startswith(error.name + "."):
            raise  # the module exists; something it imports is missing: not this error
        raise MissingCommandError(f"its module {module_name} is missing from this installation "
                                  f"({error}); reinstall megatron_mole") from None
    if module_name.startswith("tools.") and Path(module.__file__).resolve().parent != TOOLS_DIR:
        raise MissingCommandError(f"{module_name} resolved to {module.__file__}, not {TOOLS_DIR}: "
                                  f"another package named 'tools' shadows the checkout's")
    return module


def build_parser():
    parser = argparse.ArgumentParser(prog="megatron-mole", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true",
                        help="show Megatron-core's 'Apex / Transformer Engine not installed' warnings "
                             "(also MEGATRON_MOLE_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Global options come before the subcommand; everything after it is the subcommand's.
    split = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), len(argv))
    options = parser.parse_args(argv[:split])
    if options.verbose:
        megatron_mole.set_verbose(True)
    if split == len(argv):
        parser.print_help()
        return 0
    name, rest = argv[split], argv[split + 1:]
    if name not in SUBCOMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}")
    return run_command(f"megatron-mole {name}", _run, (name, rest))


def _run(name_and_args) -> int:
    name, rest = name_and_args
    module = load_command(name)
    sub = argparse.ArgumentParser(prog=f"megatron-mole {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    return module.run(sub.parse_args(rest))
