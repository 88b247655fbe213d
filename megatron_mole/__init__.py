"""megatron_mole: sparse Mixtures of LoRA Experts (MoLE) for Megatron-core.

Public surface (see README):

    import megatron_mole as mm
    mm.init_distributed(tp=1, pp=1, ep=1, device="auto")
    cfg = mm.MoLEConfig(num_experts=4, rank=8, alpha=16, top_k=1, router="topk")
    model = mm.apply_mole(gpt_model, cfg)
    sd = mm.adapter_state_dict(model)
    mm.load_adapter_state_dict(model, sd)

Names are resolved lazily so that the plain-PyTorch parts (routing, experts, hf)
import without pulling in Megatron-core; this file imports no torch.

Quiet by default: Megatron-core warns on import, in every process, that NVIDIA Apex
and Transformer Engine are not installed. Both are optional GPU accelerators, so on
CPU (and on GPUs without them) the warnings say nothing to act on; they are hidden
unless ``MEGATRON_MOLE_VERBOSE=1`` (``megatron-mole --verbose``; child processes
inherit the variable) or ``set_verbose(True)``. The filter is installed here
because every entry point imports this package before Megatron-core.
"""
import importlib
import os
import warnings

__version__ = "0.1.0"

VERBOSE_ENV = "MEGATRON_MOLE_VERBOSE"
# The messages of megatron-core 0.16's optional-dependency warnings (matched at the start).
_OPTIONAL_DEPENDENCY_WARNINGS = r"(Transformer Engine and Apex are|Apex is|Transformer Engine is) not installed"


def _filter_optional_dependency_warnings(verbose: bool) -> None:
    # filterwarnings puts the newest filter first, so the last call wins.
    warnings.filterwarnings("default" if verbose else "ignore", message=_OPTIONAL_DEPENDENCY_WARNINGS,
                            category=UserWarning)


def set_verbose(verbose: bool = True) -> None:
    """Show (True) or hide (False) Megatron-core's "Apex / Transformer Engine not
    installed" warnings, in this process and in processes it starts later."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    _filter_optional_dependency_warnings(verbose)


if os.environ.get(VERBOSE_ENV, "0").strip().lower() in ("", "0", "false", "no"):
    _filter_optional_dependency_warnings(False)

_LAZY = {
    "init_distributed": "megatron_mole.runtime",
    "MoLEConfig": "megatron_mole.config",
    "apply_mole": "megatron_mole.model",
    "adapter_state_dict": "megatron_mole.model",
    "load_adapter_state_dict": "megatron_mole.model",
}

__all__ = sorted(_LAZY) + ["__version__", "set_verbose"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_mole' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
