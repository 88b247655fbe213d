"""The LLaVA family of ``megatron-mole train`` (family.py): MoLE on the LM, the projector, Parrot.

A converted ``LlavaForConditionalGeneration`` (checkpoint/llava.py) trains on image instruction
JSONL (mm_data.py) through the shared loop; what this family adds:

- **Data**: ``MultimodalDataset`` (the base's tokenizer and image processor: ``multimodal.
  image_processor``, else the tokenizer directory) and ``MultimodalBatchLoader``, the GPT
  loader's resumable domain-mixing stream with one image per row. Text rows are padded to
  ``data.seq_length``, so every micro-batch has the combined length ``S + V - 1`` (V visual
  tokens); under pipeline parallelism LLaVAModel pads to the LM's max length
  (llava_run.schedule_seq_length).
- **Loss**: the loop's (every supervised token of the global batch weighs the same, whatever
  the DP size or micro-batch split), on LLaVAModel's per-token losses and its loss mask over the
  combined sequence (the visual positions carry no loss); per-domain losses likewise.
- **Trainable**: the LM's MoLE adapters; the projector with ``multimodal.projector_trainable``;
  Parrot (``multimodal.parrot``) inserted after ``apply_mole``. Parrot's stage 1 (steps
  1..stage1_steps) trains the projector alone with the MoE bypassed; stage 2 the MoE, the
  projector and the adapters. The trainable set is fixed when Megatron's DDP and optimizer are
  built, so the switch rebuilds both (a fresh Adam over the stage-2 set, as Parrot's second
  run starts; the LR schedule continues). The vision tower and the LM's base weights stay frozen.
- **Checkpoints**: beside the adapters, the projector (full tensors, when trainable) and Parrot's
  tensors in the shared payload; their Adam state goes through dist_checkpointing with the
  adapters' (optim_state.trainable_sharded_state_dict). The optimizer in memory after step s
  belongs to the stage of step max(s, 1), so a resume builds that one, loads its state, and
  switches at the same step as the uninterrupted run.
- **Export**: ``megatron-mole export --checkpoint CKPT --out DIR`` writes the LLaVA adapter
  directory (LM adapters, projector, Parrot) for ``megatron_mole.hf.load_mole_adapter``.

Legend: B rows, S text sequence, C combined (image + text) sequence, V visual tokens.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_mole.training.family import GPTFamily, tokenizer_dir
from megatron_mole.training.train_config import ConfigError, MultimodalConfig, TrainConfig

__all__ = ["LLaVAFamily"]


class LLaVAFamily(GPTFamily):
    name = "llava"

    def __init__(self, spec: dict):
        self.spec = spec
        self.image_seq_length = spec["llava"]["image_seq_length"]
        self.image_token = spec["llava"]["image_token_index"]
        self.stage = None  # Parrot's stage of the optimizer in memory

    # ------------------------------------------------------------------ config
    def check(self, cfg: TrainConfig, spec: dict):
        ckpt = cfg.base.checkpoint
        refusals = [
            ("base.model", cfg.base.model != "gpt", f"a LLaVA base builds Megatron's LLaVAModel; got {cfg.base.model!r}"),
            ("data.prefix", bool(cfg.data.prefix), "preprocessed text data does not apply to a LLaVA base; give "
                                                   "image instruction JSONL in data.paths"),
            ("data.packing", cfg.data.packing, "image rows are not packed (one image per row); set it false"),
            ("parallel.vpp", cfg.parallel.vpp not in (None, 1), "LLaVAModel has no virtual pipeline"),
            ("parallel.ep", cfg.parallel.ep > 1, "a LLaVA base's LM is dense: expert parallelism does not apply"),
            ("parallel.sequence_parallel", cfg.parallel.sequence_parallel,
             "not supported on a LLaVA base (its builder turns it off)"),
            ("trainable", cfg.trainable != "adapters", "router tuning needs an MoE base; a LLaVA base's LM is dense"),
            ("trainable_experts", cfg.trainable_experts is not None, "CEFT needs an MoE base"),
            ("mole.method", cfg.mole.get("method") == "factorllm", "FactorLLM is not supported on a LLaVA base"),
        ]
        for key, refused, why in refusals:
            if refused:
                raise ConfigError(key, f"{why} ({ckpt} is a LLaVA base)")
        combined = cfg.data.seq_length + self.image_seq_length - 1
        limit = spec["gpt"]["max_sequence_length"]
        if combined > limit:
            raise ConfigError("data.seq_length", f"{cfg.data.seq_length} text tokens + {self.image_seq_length} "
                                                 f"visual tokens - 1 = {combined} exceed the LM's max_sequence_length "
                                                 f"{limit} ({ckpt})")

    def _mm(self, cfg: TrainConfig) -> MultimodalConfig:
        return cfg.multimodal or MultimodalConfig()

    # ------------------------------------------------------------------ data
    def build_dataset(self, cfg: TrainConfig):
        from transformers import AutoImageProcessor, AutoTokenizer

        from megatron_mole.training.mm_data import MultimodalDataset

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg))
        processor = AutoImageProcessor.from_pretrained(self._mm(cfg).image_processor or tokenizer_dir(cfg))
        return MultimodalDataset.from_jsonl(cfg.data.paths, tokenizer, processor, cfg.data.seq_length,
                                            self.image_token, strict=cfg.data.strict)

    def make_loader(self, dataset, cfg: TrainConfig, dp_rank: int, dp: int):
        from megatron_mole.training.mm_data import MultimodalBatchLoader

        return MultimodalBatchLoader(dataset, cfg.parallel.global_batch, weights=cfg.data.domain_weights,
                                     seed=cfg.data_seed, dp_rank=dp_rank, dp_size=dp)

    def seq_length(self, trainer) -> int:
        from megatron_mole.checkpoint.llava_run import schedule_seq_length

        combined = trainer.cfg.data.seq_length + self.image_seq_length - 1
        return schedule_seq_length(trainer.model[0], combined)

    def tokens(self, global_batch: dict) -> int:
        rows = global_batch["lengths"].shape[0]
        return int(global_batch["lengths"].sum()) + rows * (self.image_seq_length - 1)

    # ------------------------------------------------------------------ model
    def prepare(self, trainer, chunks):
        from megatron_mole.layers.parrot import apply_parrot

        self.cfg = trainer.cfg
        parrot = self._mm(trainer.cfg).parrot
        if parrot is not None:
            seed = trainer.cfg.seed if parrot.seed is None else parrot.seed
            for chunk in chunks:
                apply_parrot(chunk, parrot.num_experts, parrot.ffn_hidden_size, parrot.alpha, parrot.lora_rank,
                             parrot.lora_alpha, seed=seed)

    def stage_of(self, step: int):
        """Parrot's stage of (1-based) step ``step``; None without Parrot."""
        parrot = self._mm(self.cfg).parrot
        if parrot is None:
            return None
        return 1 if step <= parrot.stage1_steps else 2

    def set_trainable(self, chunks, step: int):
        """The trainable set of the optimizer in memory after ``step`` completed steps."""
        from megatron_mole.layers.parrot import parrot_module, set_parrot_stage
        from megatron_mole.model import set_projector_trainable

        mm = self._mm(self.cfg)
        self.stage = self.stage_of(max(step, 1))
        if self.stage is None:
            set_projector_trainable(chunks, mm.train_projector)
            return
        set_parrot_stage(chunks, self.stage)  # the projector trains in both stages ...
        if not mm.train_projector:  # ... unless asked not to (stage 2 only: config.py checks)
            for chunk in chunks:
                wrapper = parrot_module(chunk)
                for p in wrapper.base.parameters() if wrapper is not None else ():
                    p.requires_grad_(False)

    def before_step(self, trainer):
        stage = self.stage_of(trainer.step + 1)
        if stage == self.stage:
            return
        chunks = [ddp.module for ddp in trainer.model]
        self.set_trainable(chunks, trainer.step + 1)
        trainer.build_optimizer(chunks)
        trainer.announce(f"Parrot stage {stage} from step {trainer.step + 1}: {self.summary(trainer)}; "
                     f"a fresh optimizer over this set, the LR schedule continues")

    def load_state(self, trainer, chunks, shared: dict):
        from megatron_mole.checkpoint.llava_adapter import load_multimodal_state
        from megatron_mole.errors import CheckpointError

        state = shared.get("multimodal")
        if state is None:
            raise CheckpointError("the checkpoint holds no multimodal state (it was not trained on a LLaVA base)")
        has_parrot = bool(state.get("parrot"))
        if has_parrot != (self._mm(trainer.cfg).parrot is not None):
            raise ConfigError("multimodal.parrot", f"the checkpoint was trained {'with' if has_parrot else 'without'}"
                                                   f" Parrot; this config {'lacks' if has_parrot else 'adds'} it")
        load_multimodal_state(chunks, state.get("projector") or {}, state.get("parrot") or {})

    def state(self, trainer) -> dict:
        from megatron_mole.model import parrot_state_dict, projector_state_dict

        chunks = [ddp.module for ddp in trainer.model]
        mm = self._mm(trainer.cfg)
        parrot = getattr(chunks[0], "parrot_config", None)
        return {"projector": projector_state_dict(chunks) if mm.train_projector else {},
                "parrot": parrot_state_dict(chunks), "parrot_config": parrot, "parrot_stage": self.stage,
                "projector_trainable": mm.train_projector}

    def summary(self, trainer) -> str:
        from megatron_mole.model import multimodal_parameters

        counts = {}
        for name, p in multimodal_parameters(trainer.model).items():
            if p.requires_grad:
                part = "Parrot" if name.startswith("parrot.") else "projector"
                counts[part] = counts.get(part, 0) + p.numel()
        stage = "" if self.stage is None else f"Parrot stage {self.stage}, "
        parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "none"
        return f"multimodal: {stage}trainable besides the LM's adapters (this rank's shard): {parts}"

    # ------------------------------------------------------------------ one micro-batch
    def forward_step(self, trainer, scale, data_iterator, model_chunk):
        from megatron_mole.layers.context import routing_inputs

        micro = {k: v.to(trainer.device, non_blocking=True) for k, v in next(data_iterator).items()}
        # prompt_mask: Parrot's text (padding and the answer left out)
        with routing_inputs(condition=micro["prompt_mask"]):
            output_BC, loss_mask_BC = model_chunk(micro["images"].to(trainer.dtype), micro["input_ids"], None, None,
                                                  labels=micro["labels"], loss_mask=micro["loss_mask"])
        return output_BC, partial(self._loss, trainer, micro["domain_ids"], loss_mask_BC, scale)

    @staticmethod
    def _loss(trainer, domain_ids_B, loss_mask_BC, scale, output_BC):
        rows = {"loss_mask": loss_mask_BC.float(), "domain_ids": domain_ids_B[:, None].expand_as(loss_mask_BC)}
        return trainer.loss(rows, scale, output_BC)
