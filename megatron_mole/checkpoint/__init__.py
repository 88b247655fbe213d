"""Checkpoints: Hugging Face <-> Megatron-core conversion, adapters, training state.

    from megatron_mole.checkpoint import hf_to_mcore, mcore_to_hf, load_model
    hf_to_mcore("Llama-3-8B", "llama3-mcore", tp=8)     # one CPU process
    mm.init_distributed(tp=2, pp=2)                      # in each rank, later
    model = load_model("llama3-mcore")                   # GPTModel at this layout

Modules: ``keymaps`` (declarative name maps and reversible tensor ops), ``spec`` (HF
config -> Megatron config, refusing what is not exact), ``hf_io`` (safetensors reading
and writing), ``mcore`` (GPTModel build, dist_checkpointing load), ``convert``,
``cli`` and ``verify`` (the ``convert`` and ``verify`` subcommands); ``adapters`` and
``export_cli`` (adapter save/export/merge, ``export``); ``ckpt_io`` (atomic multi-rank
training checkpoints, written by the training loop and read by ``export``).
Names resolve lazily: importing this package does not import Megatron-core.
"""
import importlib

_LAZY = {
    "hf_to_mcore": "megatron_mole.checkpoint.convert",
    "mcore_to_hf": "megatron_mole.checkpoint.convert",
    "load_model": "megatron_mole.checkpoint.mcore",
    "load_model_chunks": "megatron_mole.checkpoint.mcore",
    "read_spec": "megatron_mole.checkpoint.mcore",
    "CheckpointError": "megatron_mole.checkpoint.hf_io",
    "UnsupportedModelError": "megatron_mole.checkpoint.spec",
    "save_adapter": "megatron_mole.checkpoint.adapters",
    "export_adapter": "megatron_mole.checkpoint.adapters",
    "import_adapter": "megatron_mole.checkpoint.adapters",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_mole.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
