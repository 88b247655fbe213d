"""`megatron-mole verify`: Megatron logits at a TP/PP/EP layout against transformers, in fp32.

Run under torchrun (``torchrun --nproc-per-node N -m megatron_mole verify --hf DIR
--mcore DIR --tp 2``). Every rank feeds the same seeded random tokens; the Megatron
model runs through Megatron's own pipeline schedule (forward only), its vocabulary-
parallel logits are gathered over TP on the last stage and stripped of the vocabulary
padding, and the transformers model scores the same tokens on ONE rank (the first
last-stage rank: tensor- and data-parallel rank 0), on the CPU by default
(``--hf-device rank`` uses that rank's device): a model sharded for TP/PP rarely fits
whole on one GPU, and one copy per last-stage GPU would multiply it. The Megatron logits
are compared there; the difference is all-reduced, printed, and the command exits 1
above the tolerance (1e-4).

With ``--adapter DIR`` (an exported adapter, ``megatron-mole export``) both sides carry
it: Megatron through ``apply_mole`` + ``load_adapter_state_dict`` of the tensors mapped
back to Megatron names (``import_adapter``), transformers through
``megatron_mole.hf.load_mole_adapter``; so the export mapping, its inverse and the
Hugging Face modules are all checked, at any layout.

Legend: B batch, S sequence, V vocabulary (Vt: this TP rank's share).
"""
from __future__ import annotations

import argparse

import torch

__all__ = ["megatron_logits", "hf_logits", "max_logits_difference", "add_arguments", "run"]

TOLERANCE = 1e-4


def megatron_logits(chunks, tokens_BS: torch.Tensor, vocab_size: int):
    """Full logits [B, S, V] on last-stage ranks (None elsewhere), via Megatron's schedule.

    ``chunks``: this rank's model chunks (several under a virtual pipeline). Each sequence
    is one micro-batch, so pipelines (interleaved ones included) have work to overlap.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens_BS.shape
    position_ids_1S = torch.arange(seq, device=tokens_BS.device).unsqueeze(0)

    def loss_func(logits_1SVt):
        logits_1SV = gather_from_tensor_model_parallel_region(logits_1SVt)[..., :vocab_size]
        return logits_1SVt.sum() * 0.0, {"logits": logits_1SV.detach().float()}

    def forward_step(data_iterator, chunk):
        tokens_1S = next(data_iterator)
        return chunk(tokens_1S, position_ids_1S, None), loss_func

    micro = list(tokens_BS.split(1, 0))
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=list(chunks),
            num_microbatches=batch,
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logits"] for o in out], dim=0)


def _is_reference_rank() -> bool:
    """The one rank that runs transformers: last pipeline stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def hf_logits(hf_dir: str, tokens_BS: torch.Tensor, adapter: str = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(tokens_BS.device)
    if adapter is not None:
        from megatron_mole.hf import load_mole_adapter

        load_mole_adapter(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens_BS).logits.float()


def _ensure_layout(tp, pp, ep, vpp, device):
    from megatron_mole import runtime

    if not runtime.is_initialized():
        return runtime.init_distributed(tp=tp, pp=pp, ep=ep, vpp=vpp, device=device)
    info = runtime.get_runtime()
    if (info.tp, info.pp, info.ep, info.vpp) != (tp, pp, ep, vpp):
        return runtime.set_model_parallel(tp=tp, pp=pp, ep=ep, vpp=vpp)
    return info


def max_logits_difference(
    hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, vpp=None,
    seed: int = 1234, batch: int = 2, seq: int = 16, device="auto", adapter: str = None, hf_device="cpu",
) -> float:
    """Max |Megatron - transformers| logits in fp32 at this layout; the same value on every rank.
    ``adapter``: an exported adapter directory loaded on both sides. ``hf_device``: where the one
    reference rank runs transformers and compares ("cpu", or "rank" for this rank's device)."""
    import torch.distributed as dist

    from megatron_mole.checkpoint.mcore import load_model_chunks, read_spec

    info = _ensure_layout(tp, pp, ep, vpp, device)
    vocab = read_spec(mcore_dir)["shapes"]["hf_vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, vocab, (batch, seq), generator=generator).to(info.device)
    chunks = load_model_chunks(mcore_dir, params_dtype=torch.float32)
    if adapter is not None:
        _apply_adapter(chunks, adapter)
    ours = megatron_logits(chunks, tokens_BS, vocab)
    diff = torch.zeros(1, dtype=torch.float64, device=info.device)
    if ours is not None and _is_reference_rank():
        where = info.device if hf_device == "rank" else torch.device(hf_device)
        reference = hf_logits(hf_dir, tokens_BS.to(where), adapter)
        diff += (ours.to(where) - reference).abs().max().double().to(info.device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def _apply_adapter(chunks, adapter_dir: str) -> None:
    from megatron_mole.checkpoint.adapters import import_adapter
    from megatron_mole.model import apply_mole, load_adapter_state_dict

    sd, cfg, _ = import_adapter(adapter_dir)
    for chunk in chunks:
        apply_mole(chunk, cfg)
    load_adapter_state_dict(list(chunks), sd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--mcore", required=True, help="converted Megatron-core directory")
    parser.add_argument("--adapter", default=None, help="exported adapter directory (megatron-mole export), "
                        "loaded on both sides")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the random tokens")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--hf-device", default="cpu", help="where the one reference rank runs transformers: "
                        "cpu (default) or rank (that rank's device; faster when the whole model fits it)")


def run(args) -> int:
    diff = max_logits_difference(args.hf, args.mcore, args.tp, args.pp, args.ep, args.vpp,
                                 seed=args.seed, batch=args.batch, seq=args.seq, device=args.device,
                                 adapter=args.adapter, hf_device=args.hf_device)
    from megatron_mole import runtime

    ok = diff <= args.tolerance
    if runtime.get_runtime().rank == 0:
        what = "" if args.adapter is None else " (with the adapter)"
        print(f"max |logits megatron - transformers|{what} = {diff:.3e} at tp={args.tp} pp={args.pp} ep={args.ep} "
              f"vpp={args.vpp} "
              f"(tolerance {args.tolerance:.0e}): {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1
