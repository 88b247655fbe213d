"""`megatron-mole verify`: Megatron logits at a TP/PP/EP layout against transformers.

Run under torchrun (``torchrun --nproc-per-node N -m megatron_mole verify --hf DIR
--mcore DIR --tp 2``). Every rank feeds the same seeded random tokens; the Megatron
model runs through Megatron's own pipeline schedule (forward only), its vocabulary-
parallel logits are gathered over TP on the last stage and stripped of the vocabulary
padding, and the transformers model scores the same tokens on ONE rank (the first
last-stage rank: tensor- and data-parallel rank 0), on the CPU by default
(``--hf-device rank`` uses that rank's device): a model sharded for TP/PP rarely fits
whole on one GPU, and one copy per last-stage GPU would multiply it. The Megatron logits
are compared there; the difference is all-reduced, printed, and the command exits 1
above the tolerance.

Precision (``--dtype``): both models run in float64 by default on CPU, so a conversion
error (any wrong bit of a weight moves the logits by far more than 1e-10 of their scale)
is told apart from fp32 accumulation-order noise (~1e-5 of the scale on a 30-layer model);
float32 is the default on GPUs and with ``--adapter`` (the MoLE routers compute in float32
by design). The check is relative: max |difference| / max |reference
logit| against 1e-10 (float64) or 1e-4 (float32). Both models hold the same weights: the
Hugging Face ones are rounded to the dtype the Megatron checkpoint records (a bf16
conversion of fp32 weights is compared with the same bf16 weights), then widened. When
the check fails, every decoder layer's output is compared too and the first layer whose
hidden states diverge is printed: that is where the wrong tensor is.

With ``--adapter DIR`` (an exported adapter, ``megatron-mole export``) both sides carry
it: Megatron through ``apply_mole`` + ``load_adapter_state_dict`` of the tensors mapped
back to Megatron names (``import_adapter``), transformers through
``megatron_mole.hf.load_mole_adapter``; so the export mapping, its inverse and the
Hugging Face modules are all checked, at any layout.

Legend: B batch, S sequence, V vocabulary (Vt: this TP rank's share).
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["megatron_logits", "hf_logits", "compare_logits", "max_logits_difference", "add_arguments", "run"]

# Relative to the logits' scale (max |reference logit|), per compute dtype.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4}


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
        return logits_1SVt.sum() * 0.0, {"logits": logits_1SV.detach()}

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


def is_reference_rank() -> bool:
    """The one rank that runs transformers: last pipeline stage, TP rank 0, DP rank 0."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def hf_logits(hf_dir: str, tokens_BS: torch.Tensor, adapter: str = None, dtype=torch.float32,
              narrow_to=None, hidden=None) -> torch.Tensor:
    """transformers' logits in ``dtype``. ``narrow_to``: round every weight to this dtype first
    (the dtype the Megatron checkpoint holds). ``hidden``: a dict that receives each decoder
    layer's output [B, S, H] by layer index."""
    from transformers import AutoModelForCausalLM

    # torch's grouped matmul (transformers' default for MoE experts) has no float64 kernel.
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    from megatron_mole.hf.factorllm import is_factorllm_dir, load_factorllm

    if is_factorllm_dir(hf_dir):  # no transformers architecture computes it: our module (hf/factorllm.py)
        model = load_factorllm(hf_dir, dtype=dtype).to(tokens_BS.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, **extra).to(tokens_BS.device)
    narrow_weights(model, dtype, narrow_to)
    if adapter is not None:
        from megatron_mole.hf import load_mole_adapter

        load_mole_adapter(model, adapter)
    handles = []
    if hidden is not None:
        for index, layer in enumerate(model.model.layers):
            handles.append(layer.register_forward_hook(_recorder(hidden, index, batch_first=True)))
    model.eval()
    try:
        with torch.no_grad(), (_KeepFloat64() if dtype == torch.float64 else contextlib.nullcontext()):
            return model(input_ids=tokens_BS).logits.to(dtype)
    finally:
        for handle in handles:
            handle.remove()


def narrow_weights(model, dtype, narrow_to) -> None:
    """Round every weight of ``model`` (held in ``dtype``) to ``narrow_to`` and back: the values the
    Megatron checkpoint holds."""
    if narrow_to is not None and narrow_to != dtype:
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(narrow_to))


class _KeepFloat64(TorchFunctionMode):
    """Inside either model's forward: a float64 tensor cast to float32 stays float64.

    transformers computes RMSNorm, softmax and MoE routing weights in float32 whatever the
    model's dtype (``hidden.to(torch.float32)``, ``softmax(..., dtype=torch.float)``), Megatron
    its router scores. Without this the float64 check would measure that float32 rounding
    (~1e-8..1e-7 of the logits). Casts of other dtypes (the rotary frequencies, float32 on
    both sides) are left alone.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype == torch.float64:
            if func is torch.Tensor.float:
                return first
            if func is torch.Tensor.to:
                args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def keep_float64(dtype):
    """:class:`_KeepFloat64` when computing in float64, else nothing."""
    return _KeepFloat64() if dtype == torch.float64 else contextlib.nullcontext()


def _recorder(store, index, batch_first):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        store.setdefault(index, []).append(out.detach() if batch_first else out.detach().transpose(0, 1))
    return hook


def _megatron_hidden_hooks(chunks, store):
    """Record each Megatron decoder layer's output [B, S, H] (gathered over sequence parallelism)."""
    from megatron.core import parallel_state as ps

    from megatron_mole.runtime.hybrid import canonical_layer_index, is_hybrid_stack

    handles = []
    for chunk in chunks:
        sp = chunk.config.sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1
        hybrid = is_hybrid_stack(chunk.decoder)

        def hook(module, args, output, sp=sp, hybrid=hybrid):
            if hybrid and (module.layer_number - 1) % 2 == 0:
                return  # a HybridModel's attention half: the GPT layer's output is its MLP half's
            out = output[0] if isinstance(output, tuple) else output
            if sp:  # [S/tp, B, H] per TP rank
                import torch.distributed as dist

                parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                out = torch.cat(parts, dim=0)
            index = canonical_layer_index(module.layer_number, hybrid)
            store.setdefault(index, []).append(out.detach().transpose(0, 1))

        for layer in chunk.decoder.layers:
            handles.append(layer.register_forward_hook(hook))
    return handles


def ensure_layout(tp, pp, ep, vpp, device):
    from megatron_mole import runtime

    if not runtime.is_initialized():
        return runtime.init_distributed(tp=tp, pp=pp, ep=ep, vpp=vpp, device=device)
    info = runtime.get_runtime()
    if (info.tp, info.pp, info.ep, info.vpp) != (tp, pp, ep, vpp):
        return runtime.set_model_parallel(tp=tp, pp=pp, ep=ep, vpp=vpp)
    return info


def resolve_dtype(dtype, device, adapter=None) -> torch.dtype:
    """``auto``: float64 where it is cheap (CPU), float32 on accelerators and with an adapter
    (the MoLE routers compute in float32 by design, so float64 would mix dtypes)."""
    if dtype in (None, "auto"):
        return torch.float64 if torch.device(device).type == "cpu" and adapter is None else torch.float32
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if resolved not in TOLERANCES:
        raise ValueError(f"--dtype must be float64, float32 or auto; got {dtype!r}")
    return resolved


def compare_logits(
    hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, vpp=None,
    seed: int = 1234, batch: int = 2, seq: int = 16, device="auto", adapter: str = None, hf_device="cpu",
    dtype="auto", tolerance=None, model: str = "gpt",
) -> dict:
    """Megatron against transformers at this layout, both in ``dtype``; the same dict on every rank:
    ``max_abs``, ``scale`` (max |reference logit|), ``max_rel`` (max_abs / scale), ``dtype``,
    ``tolerance``, ``ok`` and, when not ok, ``layers`` (per decoder layer: max |difference| of
    its output relative to that output's scale) and ``first_diverging_layer`` (or None).
    ``adapter``: an exported adapter directory loaded on both sides. ``hf_device``: where the one
    reference rank runs transformers and compares ("cpu", or "rank" for this rank's device).
    ``model``: the Megatron side's model, "gpt" (GPTModel) or "hybrid" (HybridModel of the same
    checkpoint)."""
    import torch.distributed as dist

    from megatron_mole.checkpoint.hf_io import dtype_from_name
    from megatron_mole.checkpoint.mcore import load_model_chunks, read_spec

    info = ensure_layout(tp, pp, ep, vpp, device)
    compute = resolve_dtype(dtype, info.device, adapter)
    tolerance = TOLERANCES[compute] if tolerance is None else tolerance
    spec = read_spec(mcore_dir)
    vocab = spec["shapes"]["hf_vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, vocab, (batch, seq), generator=generator).to(info.device)
    chunks = load_model_chunks(mcore_dir, params_dtype=compute, model=model)
    if adapter is not None:
        apply_adapter(chunks, adapter)
    ours_hidden, hf_hidden = {}, {}
    handles = _megatron_hidden_hooks(chunks, ours_hidden)
    try:
        with _KeepFloat64() if compute == torch.float64 else contextlib.nullcontext():
            ours = megatron_logits(chunks, tokens_BS, vocab)
    finally:
        for handle in handles:
            handle.remove()
    stats = torch.zeros(2, dtype=torch.float64, device=info.device)  # max |diff|, max |reference|
    if ours is not None and is_reference_rank():
        where = info.device if hf_device == "rank" else torch.device(hf_device)
        reference = hf_logits(hf_dir, tokens_BS.to(where), adapter, dtype=compute,
                              narrow_to=dtype_from_name(spec["params_dtype"]), hidden=hf_hidden)
        stats[0] = (ours.to(where) - reference).abs().max().double().item()
        stats[1] = reference.abs().max().double().item()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    max_abs, scale = stats.tolist()
    max_rel = max_abs / scale if scale > 0 else max_abs
    result = dict(max_abs=max_abs, scale=scale, max_rel=max_rel, dtype=str(compute).replace("torch.", ""),
                  tolerance=tolerance, ok=max_rel <= tolerance)
    if not result["ok"]:
        result["layers"] = _layer_differences(ours_hidden, hf_hidden)
        result["first_diverging_layer"] = next(
            (layer for layer, rel in sorted(result["layers"].items()) if rel > tolerance), None)
    return result


def _layer_differences(ours_hidden, hf_hidden) -> dict:
    """Relative difference of each decoder layer's output, gathered from the ranks that hold it.
    Only run when the logits disagree (it moves every layer's hidden states to every rank)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = {}
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        mine = {layer: torch.cat(parts).cpu() for layer, parts in ours_hidden.items()}
    reference = {layer: torch.cat(parts).cpu() for layer, parts in hf_hidden.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, reference))
    ours, theirs = {}, {}
    for part_ours, part_theirs in gathered:
        ours.update(part_ours)
        theirs.update(part_theirs)
    out = {}
    for layer in sorted(set(ours) & set(theirs)):
        scale = theirs[layer].abs().max().item() or 1.0
        out[layer] = (ours[layer].to(theirs[layer]) - theirs[layer]).abs().max().item() / scale
    return out


def max_logits_difference(
    hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, ep: int = 1, vpp=None,
    seed: int = 1234, batch: int = 2, seq: int = 16, device="auto", adapter: str = None, hf_device="cpu",
    dtype="auto", model: str = "gpt",
) -> float:
    """Max |Megatron - transformers| logits at this layout (:func:`compare_logits`'s ``max_abs``)."""
    return compare_logits(hf_dir, mcore_dir, tp, pp, ep, vpp, seed, batch, seq, device, adapter, hf_device,
                          dtype, model=model)["max_abs"]


def apply_adapter(chunks, adapter_dir: str) -> None:
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
    parser.add_argument("--dtype", default="auto", help="precision both models run in: float64 (default on CPU: "
                        "separates conversion errors from rounding), float32 (default on GPUs) or auto")
    parser.add_argument("--tolerance", type=float, default=None, help="max |difference| relative to max |logit| "
                        "(default 1e-10 in float64, 1e-4 in float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model", default="gpt", choices=("gpt", "hybrid"),
                        help="Megatron model to build: GPTModel or HybridModel (megatron-core >= 0.19)")
    parser.add_argument("--hf-device", default="cpu", help="where the one reference rank runs transformers: "
                        "cpu (default) or rank (that rank's device; faster when the whole model fits it)")


def run(args) -> int:
    from megatron_mole.checkpoint.mcore import read_spec

    if read_spec(args.mcore).get("architecture") == "llava":
        from megatron_mole.checkpoint.llava_run import compare_llava_logits

        if args.ep != 1 or args.vpp is not None or args.model != "gpt":
            raise SystemExit("verify: a LLaVA base runs at --ep 1 without --vpp, as Megatron's LLaVAModel")
        result = compare_llava_logits(args.hf, args.mcore, args.tp, args.pp, seed=args.seed, batch=args.batch,
                                      seq=args.seq, device=args.device, dtype=args.dtype,
                                      adapter=args.adapter, tolerance=args.tolerance)
    else:
        result = compare_logits(args.hf, args.mcore, args.tp, args.pp, args.ep, args.vpp, seed=args.seed,
                                batch=args.batch, seq=args.seq, device=args.device, adapter=args.adapter,
                                hf_device=args.hf_device, dtype=args.dtype, tolerance=args.tolerance,
                                model=args.model)
    from megatron_mole import runtime

    if runtime.get_runtime().rank == 0:
        print(report(result, args))
    return 0 if result["ok"] else 1


def report(result: dict, args) -> str:
    what = "" if args.adapter is None else " (with the adapter)"
    lines = [f"max |logits megatron - transformers|{what} = {result['max_abs']:.3e} at tp={args.tp} pp={args.pp} "
             f"ep={args.ep} vpp={args.vpp} in {result['dtype']}; relative to the logits' scale "
             f"{result['scale']:.3g}: {result['max_rel']:.3e} (tolerance {result['tolerance']:.0e}): "
             f"{'OK' if result['ok'] else 'FAILED'}"]
    if not result["ok"]:
        layer = result.get("first_diverging_layer")
        per_layer = ", ".join(f"{k}: {v:.1e}" for k, v in sorted(result.get("layers", {}).items()))
        lines.append(f"hidden states first diverge at decoder layer {layer} (relative difference per layer: "
                     f"{per_layer})" if layer is not None else
                     f"every decoder layer's output agrees (per layer: {per_layer}): the difference comes "
                     f"after the last layer (final norm or output layer)")
    return "\n".join(lines)
