"""`megatron-mole export`: trained adapters -> Hugging Face (MoLE format, PEFT LoRA, or merged).

    megatron-mole export --checkpoint CKPT --out DIR [--step N] [--base MCORE] [--overwrite]
                         [--format mole|peft] [--merge [--hf-base HF]]

``CKPT`` is a training checkpoint root (``latest`` picks the step; ``--step`` another),
one of its ``step_N`` directories, or a directory written by
``megatron_mole.checkpoint.adapters.save_adapter``. The converted base (its key maps and
shapes) is the one the checkpoint references, or ``--base``. A checkpoint trained on a LLaVA
base exports the LM's adapters, the projector (when it trained) and Parrot together
(checkpoint/llava_adapter.py; mole format only).

- ``--format mole`` (default): ``adapter_config.json`` + ``adapter_model.safetensors`` for
  ``megatron_mole.hf.load_mole_adapter``.
- ``--format peft``: a one-expert adapter as PEFT's LoRA (``peft.PeftModel.from_pretrained``).
- ``--merge``: a one-expert adapter added into the base weights, written as a full Hugging
  Face checkpoint (the base read from ``--hf-base``, or written back from the converted base).

One CPU process, no torchrun. Errors print one line naming the file or tensor, exit 2;
nothing is left behind.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["add_arguments", "run", "read_source"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint root, one of its step_N directories, or a save_adapter directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--base", default=None, help="converted base directory (default: the checkpoint's reference)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--format", choices=("mole", "peft"), default="mole",
                        help="mole: for megatron_mole.hf.load_mole_adapter; peft: PEFT LoRA (one expert only)")
    parser.add_argument("--merge", action="store_true",
                        help="write the base with the (one-expert) adapter merged into its weights")
    parser.add_argument("--hf-base", default=None,
                        help="with --merge: the Hugging Face base directory (default: written back from --base)")


def read_source(path: str, step=None, multimodal: bool = False):
    """(Megatron adapter state dict, MoLEConfig dict, base reference) of a training checkpoint
    or a ``save_adapter`` directory; with ``multimodal``, a fourth entry: the checkpoint's
    projector and Parrot state (LLaVA bases; None otherwise)."""
    from megatron_mole.checkpoint.adapters import SAVED_CONFIG, load_saved_adapter
    from megatron_mole.checkpoint import ckpt_io

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if os.path.exists(os.path.join(path, SAVED_CONFIG)):
        if step is not None:
            raise ValueError(f"--step {step}: {path} is a saved adapter, not a training checkpoint with steps")
        return (*load_saved_adapter(path), None) if multimodal else load_saved_adapter(path)
    root, name = os.path.split(os.path.abspath(path))
    if os.path.exists(os.path.join(path, ckpt_io.MANIFEST)) and name.startswith("step_"):
        if step is not None and f"step_{step}" != name:
            raise ValueError(f"--step {step} disagrees with the step directory {path}")
        checkpoint = ckpt_io.load_checkpoint(root, int(name[len("step_"):]))
    else:
        checkpoint = ckpt_io.load_checkpoint(path, step)
    shared = checkpoint.shared
    if not isinstance(shared, dict) or "adapters" not in shared:
        raise ckpt_io.CheckpointError(f"{checkpoint.path} holds no adapters (not a training checkpoint)")
    cfg = shared.get("mole_config") or (shared.get("config") or {}).get("mole")
    if cfg is None:
        raise ckpt_io.CheckpointError(f"{checkpoint.path}/{ckpt_io.SHARED} has no MoLE configuration")
    out = shared["adapters"], cfg, shared.get("base") or {}
    return (*out, shared.get("multimodal")) if multimodal else out


def export(args) -> str:
    from megatron_mole.checkpoint import adapters
    from megatron_mole.checkpoint.convert import atomic_output_dir
    from megatron_mole.checkpoint.mcore import read_spec
    from megatron_mole.hf.peft import write_peft_adapter

    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(args.out)} already exists "
                              f"(pass --overwrite to replace it)")
    if args.hf_base and not args.merge:
        raise ValueError("--hf-base is only used with --merge")
    sd, cfg, base_ref, multimodal = read_source(args.checkpoint, args.step, multimodal=True)
    base_dir = args.base or base_ref.get("checkpoint")
    if not base_dir:
        raise ValueError(f"{args.checkpoint} names no base checkpoint: pass --base (the converted base directory)")
    spec = read_spec(base_dir)
    if multimodal is not None:  # trained on a LLaVA base: LM adapters + projector + Parrot
        from megatron_mole.checkpoint.llava_adapter import write_llava_adapter

        if args.merge or args.format != "mole":
            raise ValueError("a LLaVA checkpoint exports in the mole format only (no --merge, no --format peft)")
        config = write_llava_adapter(args.out, sd, cfg, spec, multimodal["projector"] or None, multimodal["parrot"],
                                     multimodal["parrot_config"], args.overwrite,
                                     {**base_ref, "checkpoint": os.path.abspath(base_dir)})
        parrot = multimodal["parrot_config"]
        return f"LLaVA adapter ({len(config['modules'])} modules, method {config['method']}, projector " \
               f"{'yes' if multimodal['projector'] else 'no'}, Parrot " \
               f"{parrot['num_experts'] if parrot else 0} experts)"
    config, tensors = adapters.to_hf_adapter(sd, cfg, spec, {**base_ref, "checkpoint": os.path.abspath(base_dir)})
    if args.merge:
        if args.hf_base:
            adapters.merge_into_base(config, tensors, args.hf_base, args.out, args.overwrite)
        else:
            adapters.merge_from_mcore(config, tensors, base_dir, args.out, args.overwrite)
        return "merged Hugging Face checkpoint"
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        if args.format == "peft":
            write_peft_adapter(tmp, config, tensors, os.path.abspath(base_dir))
        else:
            adapters.write_adapter_dir(tmp, config, tensors)
    return f"{args.format} adapter ({len(config['modules'])} modules, method {config['method']}, " \
           f"{config['num_experts']} experts, top-{config['top_k']}, expert_scope={config['expert_scope']})"


def run(args) -> int:
    from megatron_mole.errors import MoleError

    start = time.perf_counter()
    try:
        what = export(args)
    except (MoleError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"megatron-mole export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: {what} -> {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
