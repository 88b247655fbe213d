"""Running a Megatron LLaVAModel through Megatron's pipeline schedule, and ``verify`` for LLaVA bases.

A micro-batch is a dict: ``images`` [b, 3, H, W], ``input_ids`` [b, s] with ONE image token
per image (Megatron's convention), and for training ``labels`` / ``loss_mask`` [b, s] in
the text positions (and optionally ``prompt_mask`` [b, s], Parrot's prompt tokens); LLaVAModel expands all of them to the combined (image + text)
sequence itself. Every stage receives the whole dict: the last stage needs the ids to
place labels, the first the images.

Under pipeline parallelism LLaVAModel pads every sequence to its
``language_max_sequence_length``, so the schedule's sequence length is that
(:func:`schedule_seq_length`); padding sits after the text, which a causal LM never
attends to, and the logits are cut back to the combined length.

Legend: B batch, S text sequence, C combined sequence, V vocabulary (Vt: this TP rank's share).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch

__all__ = ["combined_length", "schedule_seq_length", "llava_forward_step", "megatron_llava_logits",
           "hf_llava_logits", "compare_llava_logits", "random_llava_inputs"]


def combined_length(input_ids_BS: torch.Tensor, image_token: int, image_seq_length: int) -> int:
    images = int((input_ids_BS[0] == image_token).sum())
    return input_ids_BS.shape[1] + images * (image_seq_length - 1)


def schedule_seq_length(chunk, combined: int) -> int:
    """The sequence length Megatron's schedule must be told for ``chunk`` (see the module docstring)."""
    model = _unwrap(chunk)
    if model.config.pipeline_model_parallel_size > 1:
        return model._language_max_sequence_length
    return combined


def _unwrap(chunk):
    while hasattr(chunk, "module") and not hasattr(chunk, "language_model"):
        chunk = chunk.module
    return chunk


def _loss(loss_mask_BC, output):
    losses_BC, mask_BC = output
    mask_BC = mask_BC.float()
    loss = torch.sum(losses_BC.float() * mask_BC) / mask_BC.sum().clamp(min=1)
    return loss, {"loss": loss.detach().clone()}


def llava_forward_step(data_iterator, chunk, collect_logits: Optional[int] = None):
    """Megatron forward-step function: one micro-batch dict through a LLaVAModel chunk.

    With ``collect_logits=V`` (no labels) the last stage returns the full logits [b, C, V]
    gathered over TP, cut to V (the vocabulary without padding) and to the combined length.
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_mole.layers.context import routing_inputs

    batch = next(data_iterator)
    # A batch's prompt_mask (mm_data.collate) tells Parrot the prompt tokens, padding excluded.
    with routing_inputs(condition=batch.get("prompt_mask")):
        output, loss_mask = chunk(batch["images"], batch["input_ids"], None, None, labels=batch.get("labels"),
                                  loss_mask=batch.get("loss_mask"))
    if collect_logits is not None:
        length = batch.get("combined")

        def logits_func(logits_BCVt):
            logits = gather_from_tensor_model_parallel_region(logits_BCVt)[..., :collect_logits]
            if length is not None:
                logits = logits[:, :length]
            return logits_BCVt.sum() * 0.0, {"logits": logits.detach()}

        return output, logits_func

    def loss_func(output_BC):
        return _loss(None, (output_BC, loss_mask))

    return output, loss_func


def megatron_llava_logits(chunks, images_B3HW, input_ids_BS, vocab_size: int, image_seq_length: int,
                          image_token: int):
    """Logits [B, C, V] on the last stage (None elsewhere), one sample per micro-batch."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    combined = combined_length(input_ids_BS, image_token, image_seq_length)
    micro = [{"images": images_B3HW[i:i + 1], "input_ids": input_ids_BS[i:i + 1], "combined": combined}
             for i in range(input_ids_BS.shape[0])]
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(llava_forward_step, collect_logits=vocab_size),
            data_iterator=iter(micro), model=list(chunks), num_microbatches=len(micro),
            seq_length=schedule_seq_length(chunks[0], combined), micro_batch_size=1, forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logits"] for o in out], dim=0)


def hf_llava_logits(hf_dir: str, images_B3HW, hf_ids_BS, dtype=torch.float32, narrow_to=None, adapter=None,
                    model=None):
    """transformers' LlavaForConditionalGeneration logits [B, C, V] in ``dtype``."""
    from transformers import LlavaForConditionalGeneration

    from megatron_mole.checkpoint.verify import keep_float64, narrow_weights

    if model is None:
        model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype)
        narrow_weights(model, dtype, narrow_to)
        if adapter is not None:
            from megatron_mole.hf import load_mole_adapter

            load_mole_adapter(model, adapter)
    model.eval()
    with torch.no_grad(), keep_float64(dtype):
        return model(input_ids=hf_ids_BS, pixel_values=images_B3HW.to(dtype)).logits.to(dtype)


def random_llava_inputs(spec, batch: int, text_len: int, seed: int = 1234, image_position: int = 2):
    """Seeded random images [B, 3, H, W] and Megatron ids [B, S] (one image token at ``image_position``)."""
    llava, vocab = spec["llava"], spec["shapes"]["hf_vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, llava["img_h"], llava["img_w"], generator=generator)
    ids = torch.randint(0, vocab, (batch, text_len), generator=generator)
    ids[ids == llava["image_token_index"]] = 0
    ids[:, image_position] = llava["image_token_index"]
    return images, ids


def compare_llava_logits(hf_dir: str, mcore_dir: str, tp: int = 1, pp: int = 1, seed: int = 1234, batch: int = 2,
                         seq: int = 12, device="auto", dtype="auto", adapter: Optional[str] = None,
                         tolerance: Optional[float] = None) -> dict:
    """``verify`` for a LLaVA base: Megatron's LLaVAModel at this layout against transformers on
    seeded random images and text; returns the same dict as ``verify.compare_logits`` (no per-layer
    breakdown)."""
    import torch.distributed as dist

    from megatron_mole.checkpoint.hf_io import dtype_from_name
    from megatron_mole.checkpoint.llava import hf_input_ids
    from megatron_mole.checkpoint.mcore import load_model_chunks, read_spec
    from megatron_mole.checkpoint.verify import TOLERANCES, ensure_layout, is_reference_rank, resolve_dtype

    info = ensure_layout(tp, pp, 1, None, device)
    compute = resolve_dtype(dtype, info.device, adapter)
    tolerance = TOLERANCES[compute] if tolerance is None else tolerance
    spec = read_spec(mcore_dir)
    llava = spec["llava"]
    images, ids = random_llava_inputs(spec, batch, seq, seed)
    images, ids = images.to(info.device, compute), ids.to(info.device)
    chunks = load_model_chunks(mcore_dir, params_dtype=compute)
    if adapter is not None:
        from megatron_mole.checkpoint.llava_adapter import import_llava_adapter

        import_llava_adapter(chunks, adapter)
    from megatron_mole.checkpoint.verify import keep_float64

    with keep_float64(compute):
        ours = megatron_llava_logits(chunks, images, ids, spec["shapes"]["hf_vocab_size"], llava["image_seq_length"],
                                     llava["image_token_index"])
    stats = torch.zeros(2, dtype=torch.float64, device=info.device)
    if ours is not None and is_reference_rank():
        hf_ids = hf_input_ids(ids.cpu(), llava["image_token_index"], llava["image_seq_length"])
        reference = hf_llava_logits(hf_dir, images.cpu(), hf_ids, compute, dtype_from_name(spec["params_dtype"]),
                                    adapter)
        stats[0] = (ours.cpu() - reference).abs().max().double().item()
        stats[1] = reference.abs().max().double().item()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    max_abs, scale = stats.tolist()
    max_rel = max_abs / scale if scale > 0 else max_abs
    return dict(max_abs=max_abs, scale=scale, max_rel=max_rel, dtype=str(compute).replace("torch.", ""),
                tolerance=tolerance, ok=max_rel <= tolerance)
