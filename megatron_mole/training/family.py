"""Model families of ``megatron-mole train``: what differs between a GPT base and a LLaVA base.

The loop (loop.py) is one for every base: runtime, model chunks, MoLE, Megatron's DDP,
optimizer and scheduler, the pipeline schedule, the loss normalisation, logging, router
statistics and checkpoints. A family supplies the rest through these hooks (``GPTFamily``
is the reference; ``llava_family.LLaVAFamily`` the multimodal one):

- ``check(cfg, spec)``: config errors against the base, before anything starts (a
  ``ConfigError`` naming the field: the ``multimodal`` section or image records on a GPT
  base; packing, a virtual pipeline or router tuning on a LLaVA base);
- ``build_dataset(cfg)``, ``make_loader(...)``: the data and its resumable global-batch loader;
- ``prepare(trainer, chunks)`` after ``apply_mole``; ``load_state`` / ``state``: what a
  checkpoint holds besides the adapters; ``set_trainable(chunks, step)`` before the optimizer
  is built; ``before_step(trainer)`` may change the trainable set (Parrot's stage 2), after
  which the loop rebuilds DDP and the optimizer (``Trainer.build_optimizer``);
- ``forward_step``, ``seq_length``, ``tokens``: one micro-batch through a chunk, the schedule's
  sequence length, the tokens of a global batch (throughput);
- ``summary(trainer)``: an extra log line (or None).

``family_for(cfg)`` reads the converted checkpoint's spec: architecture ``llava`` gives the
LLaVA family, anything else the GPT one (what users expect: the base decides, no config field).
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from megatron_mole.training.data import InstructionDataset, packed_attention_mask
from megatron_mole.training.sampler import GlobalBatchLoader
from megatron_mole.training.train_config import ConfigError, TrainConfig

__all__ = ["GPTFamily", "family_for", "tokenizer_dir", "first_image_record"]


def tokenizer_dir(cfg: TrainConfig) -> str:
    """``base.tokenizer``, else the converted checkpoint's copy of the HF files, else the checkpoint dir."""
    if cfg.base.tokenizer:
        return cfg.base.tokenizer
    copied = Path(cfg.base.checkpoint) / "hf"
    return str(copied) if (copied / "tokenizer_config.json").is_file() else cfg.base.checkpoint


def first_image_record(paths) -> str | None:
    """``path:line`` of the first line of ``paths`` that is a JSON object with an ``image`` field,
    looking at each file's first JSON object only (a file is text or image data throughout)."""
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue  # a bad line: the data reader reports it
                if isinstance(record, dict):
                    if "image" in record:
                        return f"{path}:{number}"
                    break
    return None


class GPTFamily:
    """A GPT (or hybrid) base on instruction JSONL or preprocessed data."""

    name = "gpt"

    def check(self, cfg: TrainConfig, spec: dict):
        architecture = spec.get("architecture", "gpt")
        if cfg.multimodal is not None:
            raise ConfigError("multimodal", f"applies to a LLaVA base; {cfg.base.checkpoint} is a {architecture} base")
        image = first_image_record(cfg.data.paths)
        if image is not None:
            raise ConfigError("data.paths", f"{image} is an image record (field 'image'): image data needs a LLaVA "
                                            f"base; {cfg.base.checkpoint} is a {architecture} base")

    def build_dataset(self, cfg: TrainConfig):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg))
        if cfg.data.prefix:  # preprocessed: memory-mapped, checked against this tokenizer
            from megatron_mole.training.indexed import IndexedInstructionDataset

            return IndexedInstructionDataset(cfg.data.prefix, tokenizer_dir(cfg), cfg.data.seq_length,
                                             strict=cfg.data.strict, tokenizer=tokenizer)
        return InstructionDataset.from_jsonl(cfg.data.paths, tokenizer, cfg.data.seq_length, strict=cfg.data.strict)

    def make_loader(self, dataset, cfg: TrainConfig, dp_rank: int, dp: int):
        return GlobalBatchLoader(dataset, cfg.parallel.global_batch, weights=cfg.data.domain_weights,
                                 seed=cfg.data_seed, packing=cfg.data.packing, dp_rank=dp_rank, dp_size=dp)

    def prepare(self, trainer, chunks):
        pass

    def load_state(self, trainer, chunks, shared: dict):
        pass

    def set_trainable(self, chunks, step: int):
        pass

    def state(self, trainer):
        return None

    def before_step(self, trainer):
        pass

    def summary(self, trainer):
        return None

    def seq_length(self, trainer) -> int:
        return trainer.cfg.data.seq_length

    def tokens(self, global_batch: dict) -> int:
        return int((global_batch["segment_ids"] > 0).sum())

    def forward_step(self, trainer, scale, data_iterator, model_chunk):
        micro = {k: v.to(trainer.device, non_blocking=True) for k, v in next(data_iterator).items()}
        attention_mask = packed_attention_mask(micro["segment_ids"]) if trainer.cfg.data.packing else None
        kwargs = {}
        if not trainer.sequence_parallel:
            kwargs["padding_mask"] = micro["segment_ids"] == 0
        elif trainer.factorllm:  # its loss hook slices the mask to its sequence shard (layers/factorllm.py)
            getattr(model_chunk, "module", model_chunk).mole_padding_mask = micro["segment_ids"] == 0
        output_BS = model_chunk(micro["tokens"], micro["position_ids"], attention_mask,
                                labels=micro["labels"].clamp(min=0), **kwargs)
        return output_BS, partial(trainer.loss, micro, scale)


def family_for(cfg: TrainConfig):
    """The family of ``cfg.base.checkpoint`` (its spec), its config checked against that base."""
    from megatron_mole.checkpoint.mcore import read_spec

    spec = read_spec(cfg.base.checkpoint)
    if spec.get("architecture") == "llava":
        from megatron_mole.training.llava_family import LLaVAFamily

        family = LLaVAFamily(spec)
    else:
        family = GPTFamily()
    family.check(cfg, spec)
    return family
