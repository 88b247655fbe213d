"""`megatron-mole analyze`: which experts each domain uses, and Router Lens's expert selection.

    [torchrun --nproc-per-node N -m] megatron-mole analyze --checkpoint DIR --data FILE [FILE ...] \\
        --out DIR [--base MCORE] [--tokenizer HF] [--step N] [--tp 1 --pp 1 --ep 1] \\
        [--max-examples 500] [--seq-length 256] [--micro-batch 8] [--select N]

``--checkpoint`` is a training checkpoint (root, ``step_N`` or a ``save_adapter`` directory:
the base it references, or ``--base``, with the adapter loaded) or a converted base
(``megatron-mole convert`` output: the frozen routers of an MoE base, no adapter). The model
runs forward (Megatron's schedule, so any TP/PP/EP layout; one process without torchrun) on
at most ``--max-examples`` examples per domain of the labelled instruction JSONL (its
``domain`` field; the training data format), one example per row, and every router's
decisions on every real token (prompt and response, template tokens included; padding
excluded) are counted per domain (analysis/capture.py). Rank 0 writes:

- ``OUT/expert_usage.json``: per router (global name, layer, kind "mole" or "moe") and domain:
  expert load, routing entropy, experts per token, and the mutual information between domain
  and expert with its normalised "specialisation" (definitions: analysis/stats.py);
- ``OUT/expert_load.png`` (domain x expert heat map per router) and ``OUT/routing_entropy.png``;
- with ``--select N``, ``OUT/selection.json``: Router Lens's choice, per router the N experts
  most often among a token's top-k on these examples (ties: lower id), which
  ``train`` with ``trainable_experts: OUT/selection.json`` fine-tunes (CEFT).

Legend: B rows, S sequence length.
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "analyze"]


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (root, step_N, save_adapter dir) or a converted base")
    parser.add_argument("--data", required=True, nargs="+", help="labelled instruction JSONL (domain field)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--base", default=None, help="converted base (default: the checkpoint's reference)")
    parser.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer dir (default: the training config's, else the base's hf/)")
    parser.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--max-examples", type=int, default=500, help="examples per domain (first ones)")
    parser.add_argument("--seq-length", type=int, default=256, help="longer examples are truncated")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per forward")
    parser.add_argument("--select", type=int, default=None, metavar="N",
                        help="also write selection.json: the N most used experts of every router")


def _source(args):
    """(adapter state dict or None, MoLEConfig dict or None, tuned base routers or None, base dir,
    tokenizer dir)."""
    from megatron_mole.checkpoint import ckpt_io
    from megatron_mole.checkpoint.export_cli import read_source
    from megatron_mole.checkpoint.mcore import SPEC_NAME

    path = args.checkpoint
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    routers = None
    if os.path.isfile(os.path.join(path, SPEC_NAME)):  # a converted base: its own routers, no adapter
        base, sd, cfg, shared = path, None, None, {}
    else:
        sd, cfg, base_ref = read_source(path, args.step)
        base = args.base or base_ref.get("checkpoint")
        if not base:
            raise ckpt_io.CheckpointError(f"{path} names no base checkpoint: pass --base")
        shared = _training_shared(path, args.step)
        routers = shared.get("base_routers")
        if routers is not None:  # a router-tuning run (trainable: routers): no adapter
            sd = cfg = None
    train_cfg = shared.get("config") or {}
    tokenizer = args.tokenizer or (train_cfg.get("base") or {}).get("tokenizer")
    if not tokenizer:
        tokenizer = os.path.join(base, "hf") if os.path.isfile(os.path.join(base, "hf", "tokenizer_config.json")) \
            else base
    return sd, cfg, routers, base, tokenizer


def _training_shared(path, step) -> dict:
    """The shared payload of a training checkpoint ({} for a save_adapter directory)."""
    from megatron_mole.checkpoint import ckpt_io

    root, name = os.path.split(os.path.abspath(path))
    try:
        if name.startswith("step_") and os.path.exists(os.path.join(path, ckpt_io.MANIFEST)):
            checkpoint = ckpt_io.load_checkpoint(root, int(name[len("step_"):]))
        else:
            checkpoint = ckpt_io.load_checkpoint(path, step)
    except ckpt_io.CheckpointError:  # a save_adapter directory: no training payload
        return {}
    return checkpoint.shared or {}


def _batches(dataset, max_examples: int, dp_rank: int, dp: int, micro_batch: int):
    """This DP rank's micro-batches (dicts of [B, S] tensors; ``domain_ids`` -1 on padding). Every DP
    rank gets the same number (padding rows fill up): expert-parallel dispatch needs every rank."""
    from megatron_mole.training.data import build_rows

    examples = [(d, ex) for d, group in enumerate(dataset.examples) for ex in group[:max_examples]]
    mine = examples[dp_rank::dp]
    count = -(-len(examples) // dp)
    rows = count + (-count) % micro_batch
    mine += [None] * (rows - len(mine))
    for start in range(0, rows, micro_batch):
        part = mine[start:start + micro_batch]
        yield build_rows([[] if e is None else [e[1]] for e in part], [[] if e is None else [e[0]] for e in part],
                         dataset.seq_length, dataset.pad_token_id)


def analyze(args) -> dict:
    """Run the analysis in this rank (all ranks call it); rank 0's return value is the report."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoTokenizer

    import megatron_mole as mm
    from megatron_mole import runtime
    from megatron_mole.analysis.capture import RoutingRecorder, gather_sums
    from megatron_mole.checkpoint.mcore import load_model_chunks
    from megatron_mole.training.data import InstructionDataset, packed_attention_mask

    for name in ("max_examples", "seq_length", "micro_batch", "tp", "pp", "ep"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    sd, cfg, tuned_routers, base, tokenizer_dir = _source(args)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset = InstructionDataset.from_jsonl(args.data, tokenizer, args.seq_length)

    if runtime.is_initialized():  # several analyses in one process (tests, notebooks): switch the layout
        info = runtime.set_model_parallel(tp=args.tp, pp=args.pp, ep=args.ep)
    else:
        info = runtime.init_distributed(tp=args.tp, pp=args.pp, ep=args.ep)
    # (Megatron's MoE layers at TP > 1 run sequence-parallel: load_model sets it; RoutingRecorder copes)
    chunks = load_model_chunks(base, params_dtype=torch.float32 if info.device.type == "cpu" else None,
                               device=info.device)
    if cfg is not None:
        mole_cfg = mm.MoLEConfig.from_dict(cfg)
        for chunk in chunks:
            mm.apply_mole(chunk, mole_cfg)
        mm.load_adapter_state_dict(chunks, sd)
    if tuned_routers is not None:
        from megatron_mole.model import load_base_router_state_dict

        load_base_router_state_dict(chunks, tuned_routers)
    for chunk in chunks:
        chunk.eval()
    recorder = RoutingRecorder(chunks, len(dataset.domains), ps.get_tensor_model_parallel_rank(),
                               ps.get_tensor_model_parallel_world_size())
    if not recorder.kinds:
        raise ValueError(f"{args.checkpoint}: the model has no router (neither a MoLE adapter nor MoE layers)")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = list(_batches(dataset, args.max_examples, dp_rank, dp, args.micro_batch))

    def forward_step(data_iterator, model):
        micro = {k: v.to(info.device) for k, v in next(data_iterator).items()}
        recorder.set_batch(micro["domain_ids"])
        output = model(micro["tokens"], micro["position_ids"], packed_attention_mask(micro["segment_ids"]),
                       labels=micro["labels"].clamp(min=0))
        return output, lambda out: (out.float().sum() * 0.0, {})

    start = time.perf_counter()
    with torch.no_grad():
        iterators = iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks]
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iterators,
                                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
                                    seq_length=args.seq_length, micro_batch_size=args.micro_batch, forward_only=True)
    recorder.remove()
    sums = gather_sums(recorder.sums)
    kinds = {}
    for part in _all_gather(recorder.kinds):
        kinds.update(part)
    seconds = time.perf_counter() - start
    if info.rank != 0:
        return {}
    source = "tuned routers" if tuned_routers is not None else "adapter" if cfg is not None else "base"
    return write_report(args, sums, kinds, dataset, base, source=source, seconds=seconds,
                        layout={"tp": args.tp, "pp": args.pp, "ep": args.ep, "dp": dp})


def _all_gather(obj) -> list:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    from megatron_mole.runtime import cpu_group

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj, group=cpu_group())
    return parts


def _layer(name: str):
    import re

    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def write_report(args, sums: dict, kinds: dict, dataset, base, source: str, seconds: float, layout: dict) -> dict:
    from megatron_mole.analysis.plots import plot_entropy, plot_expert_load
    from megatron_mole.analysis.stats import select_experts, summarize

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(sums, key=lambda n: (_layer(n) if _layer(n) is not None else -1, n))
    routers = {}
    for name in order:
        routers[name] = {"kind": kinds[name], "layer": _layer(name), **summarize(sums[name], dataset.domains)}
    examples = {d: min(len(g), args.max_examples) for d, g in zip(dataset.domains, dataset.examples)}
    report = {"checkpoint": os.path.abspath(args.checkpoint), "base": os.path.abspath(base), "source": source,
              "data": [os.path.abspath(p) for p in args.data], "domains": list(dataset.domains),
              "examples": examples, "tokens_counted": "every non-padding token (prompt and response)",
              "layout": layout, "seconds": round(seconds, 2), "routers": routers}
    with open(out / "expert_usage.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
    title = f"{os.path.join(*Path(os.path.abspath(args.checkpoint)).parts[-2:])}: {source}"
    plot_expert_load(routers, out / "expert_load.png", title)
    plot_entropy(routers, out / "routing_entropy.png", title)
    if args.select is not None:
        selection = {"select": args.select, "probe_examples": examples, "checkpoint": report["checkpoint"],
                     "routers": {name: {"kind": kinds[name], "layer": _layer(name),
                                        "experts": select_experts(sums[name]["uses_DE"].sum(0), args.select),
                                        "uses": [int(v) for v in sums[name]["uses_DE"].sum(0)]}
                                 for name in order}}
        with open(out / "selection.json", "w", encoding="utf-8") as handle:
            json.dump(selection, handle, indent=1)
    return report


def run(args) -> int:
    from megatron_mole.errors import MoleError

    try:
        report = analyze(args)
    except (MoleError, OSError, ValueError) as error:
        print(f"megatron-mole analyze: error: {error}", file=sys.stderr, flush=True)
        return 2
    if report:
        for name, r in report["routers"].items():
            print(f"analyze: {name} ({r['kind']}): specialisation {r['specialisation']:.3f}, entropy "
                  f"{r.get('entropy', {}).get('all', float('nan')):.3f} nats, experts/token "
                  f"{r['experts_per_token'].get('all', 0):.2f}", flush=True)
        print(f"analyze: wrote {Path(args.out) / 'expert_usage.json'} and plots"
              + (f", selection.json (top {args.select})" if args.select else ""), flush=True)
    return 0
