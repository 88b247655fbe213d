"""The training loop of ``megatron-mole train``, on Megatron-core's own machinery.

``train(cfg)`` runs in every rank (torchrun): ``init_distributed`` at the config's
layout, ``checkpoint.load_model`` (the converted base, resharded to this layout),
``apply_mole`` (freezes the base), Megatron's ``DistributedDataParallel`` and
``get_megatron_optimizer`` (Adam, optionally its distributed optimizer) over the
adapter parameters only, Megatron's ``OptimizerParamScheduler`` (linear warmup,
then constant/linear/cosine decay), and ``get_forward_backward_func`` over the
micro-batches of each global batch (1F1B under pipeline parallelism; with ``parallel.vpp``
one model chunk per virtual stage and Megatron's interleaved schedule: PP4 x VPP2 and, with
unbatched p2p ops, PP2 x VPP2 reproduce PP4's and PP2's losses on 4 CPU ranks).

Notable:

- **Model families** (family.py): what differs between bases (dataset and loader, the forward step,
  the schedule's sequence length, config checks against the base, extra checkpoint state, a
  trainable set that changes mid-run) comes from ``family_for(cfg)``: GPT/hybrid bases, or a LLaVA
  base (llava_family.py: image JSONL, MoLE on the LM, the projector, Parrot's two stages).
- **Loss normalisation.** A step's loss is the mean over every supervised (response)
  token of the global batch, whatever the data-parallel size or micro-batch split.
  Every rank builds the whole global batch (sampler.py), so each knows the token
  count N; a micro-batch returns ``sum(losses) * num_microbatches * dp / N``, which
  the schedule divides by ``num_microbatches`` and DDP averages over ``dp``.
- **Aux losses** (MoLE load balance, z-loss) ride on activations
  (``routing.AuxLossScaler``) with gradient scale ``1 / num_microbatches``, the
  scaling Megatron's schedules give its own MoE aux losses: the routers get the
  gradient of (main loss + mean over micro-batches and DP ranks of the aux losses).
- **Expert parallelism**: ``parallel.ep`` shards the LoRA experts over the EP group
  (``mole.dispatch: alltoall``; dispatch/sharding.py); a dense base is built with
  Megatron's EP size 1 (Megatron refuses EP without MoE layers). Expert params
  (``allreduce=False``) get their own chained optimizer over the expert-data-parallel group.
- **Padding** is passed to the model as ``padding_mask`` so routers leave it out of
  their aux losses, except under sequence parallelism (Megatron scatters the mask on
  the first pipeline stage only, while MoLE layers see the gathered sequence); there
  FactorLLM's loss hook gets it as the model's ``mole_padding_mask`` and slices it itself.
- **Precision**: ``auto`` is fp32 on CPU and bf16 on GPUs: the base is loaded in
  bf16, adapters are created in the base's dtype (routers stay fp32), and
  Megatron's mixed-precision optimizer keeps fp32 main parameters (saved in
  checkpoints, so a bf16 resume keeps them exactly too).
- **Checkpoints** (checkpoint/ckpt_io, atomic, last K kept) hold the full adapter tensors with
  global names, the scheduler, the sampler position, Adam's step count, the base reference,
  the layout and the config (shared), per rank all RNG states, and the optimizer state
  (Adam moments, fp32 main params) in Megatron's dist_checkpointing format, keyed by global
  adapter names (checkpoint/optim_state.py). The adapters are loaded before the optimizer is
  built (its fp32 main copies start from them). At the same layout a resume reproduces the
  uninterrupted run bit for bit (losses and LRs, fp32 and bf16); at another TP/PP/EP/DP
  layout the optimizer state is resharded by dist_checkpointing (losses within ~1e-7
  relative in fp32); only the RNG states (dropout) are not carried over. A FactorLLM run
  saves its trained params (routers, experts or expert adapters) with the optimizer state
  instead, and ``model_step_N`` beside it; its teacher is always rebuilt from the base.
- **LR schedule**: step i (1-based) runs at the schedule's value after i scheduler
  increments, so the first step trains (Megatron's warmup starts at 0); decay ends
  one step after ``max_steps``. Config values win over a checkpoint's on resume; the
  resumed scheduler restarts from its saved count (not on top of the one increment
  ``__init__`` makes).

Legend: G global batch rows, B rows on this rank, S sequence length, D domains.
"""
import hashlib
import os
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from megatron_mole.checkpoint import ckpt_io, optim_state
from megatron_mole.training.data import domain_loss_sums, split_microbatches
from megatron_mole.training.family import family_for
from megatron_mole.model import format_trainable_summary, update_global_balance
from megatron_mole.training.logging import RouterLoadMonitor, StepLogger, gather_router_stats, recent_records, \
    weighted_aux_loss
from megatron_mole.training.train_config import ConfigError, TrainConfig, config_to_dict


@dataclass
class TrainResult:
    # the last RECORDS_KEPT step records (logging.py): memory stays flat over a long run; the log has them all
    records: deque = field(default_factory=recent_records)
    start_step: int = 0
    final_step: int = 0
    data_report: object = None
    resharded: bool = False  # resumed at another layout (optimizer state resharded, RNG not restored)
    last_checkpoint: str | None = None
    adapter_params: int = 0  # trainable elements on this rank


def _start_runtime(cfg: TrainConfig):
    """init_distributed at the config's layout; switches the layout of a running runtime (several jobs
    in one process, e.g. tests or notebooks)."""
    from megatron_mole import runtime

    p = cfg.parallel
    vpp = p.vpp if p.vpp not in (None, 1) else None
    if runtime.is_initialized():
        info = runtime.get_runtime()
        if (info.tp, info.pp, info.ep, info.vpp) != (p.tp, p.pp, p.ep, vpp):
            info = runtime.set_model_parallel(tp=p.tp, pp=p.pp, ep=p.ep, vpp=vpp, seed=cfg.seed)
    else:
        info = runtime.init_distributed(tp=p.tp, pp=p.pp, ep=p.ep, vpp=vpp, seed=cfg.seed)
    p.data_parallel_size(info.world_size)  # checks the batch sizes against this world
    return info


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    name = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return torch.bfloat16 if name == "bf16" else torch.float32


def _file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _base_overrides(cfg: TrainConfig) -> dict:
    """TransformerConfig overrides for ``load_model``: sequence parallelism as configured (a dense
    base at ep > 1 is handled by ``load_model`` itself), and unbatched pipeline p2p for the virtual
    pipeline at pp=2 (there a rank's previous and next stage are one peer, and Megatron-core's
    batched ops post [send_prev, recv_prev, send_next, recv_next]: the peer's gradient and activation
    (same shape) are matched to the receives crosswise, silently (tests/test_megatron_p2p.py). Its
    unbatched path orders the ops by even/odd rank and is exact: PP2 x VPP2 = PP2 bit for bit), and
    the activation recompute of ``parallel.recompute`` (Megatron's recompute_* fields)."""
    p = cfg.parallel
    overrides = {"sequence_parallel": True} if p.sequence_parallel else {}
    overrides.update(p.recompute_overrides())
    if p.pp == 2 and p.vpp not in (None, 1):
        overrides["batch_p2p_comm"] = False
    return overrides


class Trainer:
    """One training job in this rank; ``run()`` trains to ``schedule.max_steps``."""

    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state as ps

        import megatron_mole as mm
        from megatron_mole.checkpoint.mcore import load_model_chunks

        self.cfg = cfg
        self.family = family_for(cfg)  # GPT or LLaVA (family.py); its config checks against the base
        self.dataset = self.family.build_dataset(cfg)  # first: bad data is reported before Megatron starts
        self.info = _start_runtime(cfg)
        self.rank, self.device = self.info.rank, self.info.device
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.layout = {"world_size": self.info.world_size, "tp": self.info.tp, "pp": self.info.pp,
                       "ep": self.info.ep, "dp": self.dp, "distributed_optimizer": cfg.optimizer.distributed}
        self.logger = None
        self.dtype = _precision(cfg, self.device)

        self.loader = self.family.make_loader(self.dataset, cfg, self.dp_rank, self.dp)

        self.memory_line = self._check_memory()  # before the base is loaded: stop early, with a reason
        # One chunk per virtual pipeline stage (one without VPP); every list below follows them.
        chunks = load_model_chunks(cfg.base.checkpoint, params_dtype=self.dtype,
                                   config_overrides=_base_overrides(cfg), device=self.device,
                                   model=cfg.base.model, attention=cfg.base.attention)
        self.mole_config = mm.MoLEConfig(**cfg.effective_mole())
        self.factorllm = self.mole_config.method == "factorllm"
        self.tune_routers = cfg.trainable == "routers"
        if self.tune_routers:  # Router Lens's router tuning: the base's own routers, no adapter
            from megatron_mole.model import unfreeze_base_routers

            if cfg.checkpoint.load_dir is not None:
                raise ConfigError("trainable", "router tuning runs are short and not resumable; "
                                  "remove checkpoint.load_dir")
            if unfreeze_base_routers(chunks) == 0:
                raise ConfigError("trainable", f"'routers' needs an MoE base; {cfg.base.checkpoint} has no MoE router")
        else:
            for chunk in chunks:
                mm.apply_mole(chunk, self.mole_config, options=cfg.factorllm if self.factorllm else None)
        self.family.prepare(self, chunks)
        # The adapters enter the model before the optimizer copies them (its fp32 main params under
        # bf16): loaded later, the optimizer's first step would write its stale copies back.
        self.checkpoint = self._read_checkpoint()
        if self.checkpoint is not None:
            if self.factorllm:  # after apply_mole built the teachers from the base
                optim_state.load_params(self._trained_params(chunks, adapters=True), self.checkpoint.collective_dir)
            else:
                mm.load_adapter_state_dict(chunks, self.checkpoint.shared["adapters"])
            self.family.load_state(self, chunks, self.checkpoint.shared)
        self.family.set_trainable(chunks, int(self.checkpoint.shared["step"]) if self.checkpoint else 0)
        self.monitor = RouterLoadMonitor(chunks)
        self.sequence_parallel = bool(chunks[0].config.sequence_parallel)
        self.model = self.optimizer = self.scheduler = None
        self.build_optimizer(chunks)
        self.step = 0
        self.resharded = False
        self.base_ref = {"checkpoint": os.path.abspath(cfg.base.checkpoint),
                         "spec_sha256": _file_sha256(Path(cfg.base.checkpoint) / "mcore_config.json")}

    def build_optimizer(self, chunks):
        """Megatron's DDP, optimizer and scheduler over the trainable params of ``chunks``. Called
        again when the family changes the trainable set (Parrot's stage 2): a fresh optimizer, the
        scheduler continuing from its count; the previous DDP's grad hooks are disarmed."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg = self.cfg
        for ddp in self.model or ():  # its hooks stay on the params' grad accumulators: make them no-ops
            ddp.param_to_bucket_group.clear()
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=cfg.optimizer.distributed)
        # Megatron-LM's convention: only the first chunk's buffers are bucketed.
        self.model = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=i > 0)
                      for i, chunk in enumerate(chunks)]
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=cfg.schedule.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad,
                            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
                            use_distributed_optimizer=o.distributed),
            self.model)
        no_sync = [ddp.no_sync for ddp in self.model]
        for ddp in self.model:
            ddp.config.finalize_model_grads_func = finalize_model_grads
            ddp.config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            ddp.config.grad_scale_func = self.optimizer.scale_loss
        s, previous = cfg.schedule, self.scheduler
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_steps,
            lr_decay_steps=s.max_steps + 1, lr_decay_style=s.decay_style, start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=s.max_steps + 1, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
        if previous is None:
            self.scheduler.step(increment=1)  # the LR of step 1 (see the module docstring)
        else:
            self.scheduler.num_steps = previous.num_steps
            self.scheduler.step(increment=0)

    def _check_memory(self):
        """This rank's memory estimate (training/memory.py) as one line; raises ConfigError naming the
        biggest term when it exceeds the device's memory (CPU: MemAvailable shared by this node's ranks)."""
        import json

        from megatron.core import parallel_state as ps

        from megatron_mole.training import memory

        hf_config = Path(self.cfg.base.checkpoint) / "hf" / "config.json"
        if not hf_config.is_file():
            return f"memory estimate: skipped ({hf_config} is missing)"
        try:
            shapes = memory.shapes_from_hf_config(json.loads(hf_config.read_text()))
        except (KeyError, ValueError) as error:
            return f"memory estimate: skipped ({hf_config}: {error})"
        stage = ps.get_pipeline_model_parallel_rank()
        name = "last stage" if stage == self.info.pp - 1 else "first stage"
        try:
            entry = memory.estimate(shapes, self.cfg, self.info.world_size, self.dtype.itemsize)[name]
        except (NotImplementedError, ValueError, KeyError) as error:  # a method/base the estimate does not model
            return f"memory estimate: skipped ({type(error).__name__}: {error})"
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        available, source = memory.available_memory(self.device, local_ranks)
        return memory.check_fits(entry, available, source, self.rank, f"pipeline stage {stage}")

    # ------------------------------------------------------------------ checkpoints
    def _read_checkpoint(self):
        ck = self.cfg.checkpoint
        if ck.load_dir is None:
            return None
        checkpoint = ckpt_io.load_checkpoint(ck.load_dir, ck.load_step)
        shared = checkpoint.shared
        if shared is None or "adapters" not in shared:
            raise ckpt_io.CheckpointError(f"{checkpoint.path} holds no adapter state (not a training checkpoint)")
        if checkpoint.collective_dir is None or "optimizer" not in shared:
            raise ckpt_io.CheckpointError(f"{checkpoint.path} holds no optimizer state ({ckpt_io.COLLECTIVE_DIR}/)")
        if bool(shared.get("factorllm")) != self.factorllm:
            raise ckpt_io.CheckpointError(f"{checkpoint.path} is {'' if shared.get('factorllm') else 'not '}a "
                                          f"FactorLLM training checkpoint; this run's mole.method is "
                                          f"{self.mole_config.method!r}")
        return checkpoint

    def _trained_params(self, chunks=None, adapters=False):
        """FactorLLM: its trained params' descriptions (optim_state.factorllm_params); None otherwise."""
        if not self.factorllm:
            return None
        return optim_state.factorllm_params(chunks or [ddp.module for ddp in self.model], adapters)

    def resume(self):
        """Everything but the adapters (loaded before the optimizer was built) from the checkpoint."""
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        shared = checkpoint.shared
        if shared["base"].get("spec_sha256") != self.base_ref["spec_sha256"]:
            self.announce(f"warning: {checkpoint.path} was trained on base {shared['base'].get('checkpoint')}, "
                       f"whose spec differs from {self.base_ref['checkpoint']}")
        optim_state.load_optimizer_state(self.optimizer, self.model, checkpoint.collective_dir,
                                         shared["optimizer"]["adam_step"], self._trained_params())
        # After the optimizer (whose param groups carry an LR): the scheduler sets the LR of the next
        # step. Its load_state_dict *adds* the saved count to the current one, and __init__ already
        # counted step 1's increment: start from 0 as a scheduler that never stepped.
        self.scheduler.num_steps = 0
        self.scheduler.load_state_dict(shared["scheduler"])
        self.loader.load_state_dict(shared["data"])
        self.step = int(shared["step"])
        if shared["layout"] == self.layout and checkpoint.world_size == self.info.world_size:
            rank_state = ckpt_io.load_checkpoint(checkpoint.path.parent, checkpoint.step, rank=self.rank).rank_state
            ckpt_io.restore_rng_state(rank_state["rng"])
            self.announce(f"resumed from {checkpoint.path} at step {self.step} (same layout: optimizer, "
                       f"scheduler, data position and RNG restored)")
        else:
            self.resharded = True
            self.announce(f"resumed from {checkpoint.path} at step {self.step}: it was saved at layout "
                       f"{shared['layout']}, this run has {self.layout}; adapters and optimizer state "
                       f"resharded, scheduler and data position restored, RNG not restored")

    def save(self) -> Path:
        import torch.distributed as dist

        from megatron_mole.model import adapter_state_dict

        ck = self.cfg.checkpoint
        shared, rank_payload = ckpt_io.training_payloads(
            # FactorLLM: its trained params (some in experts, split over EP) go with the optimizer state
            step=self.step, adapters={} if self.factorllm else adapter_state_dict(self.model),
            scheduler_state=self.scheduler.state_dict(),
            sampler_state=self.loader.state_dict(), base=self.base_ref, layout=self.layout,
            config=config_to_dict(self.cfg))
        shared["mole_config"] = self.mole_config.to_dict()
        extra = self.family.state(self)  # a LLaVA base: projector, Parrot
        if extra is not None:
            shared["multimodal"] = extra
        collective = None
        if self.tune_routers:  # the tuned router weights; no optimizer state (not resumable)
            from megatron_mole.model import base_router_state_dict

            shared["base_routers"] = base_router_state_dict(self.model)
        else:
            shared["optimizer"] = {"format": "megatron dist_checkpointing torch_dist, " + optim_state.METADATA[
                "distrib_optim_sharding_type"], "adam_step": optim_state.adam_step(self.optimizer)}
            shared["factorllm"] = self.factorllm

            def collective(directory):
                optim_state.save_optimizer_state(self.optimizer, self.model, directory, extra=self._trained_params(),
                                                 params=self._trained_params(adapters=True))
        path = ckpt_io.save_checkpoint(
            ck.save_dir, self.step, rank_payload, shared_payload=shared, rank=self.rank,
            world_size=self.info.world_size, barrier=dist.barrier if dist.is_initialized() else None,
            keep_last=ck.keep_last, collective=collective)
        return self._save_factorllm() if self.factorllm else path

    def _save_factorllm(self) -> Path:
        """FactorLLM trains the model's own experts and routers: beside the training checkpoint
        (resumable: ``checkpoint.load_dir``), save the model as a converted checkpoint
        ``save_dir/model_step_N`` (atomic; the frozen dense teacher is not part of the model, so
        it is not saved), loadable by ``load_model``, ``train`` and ``verify``. Expert adapters
        are merged into the expert weights for it (W + (alpha/r) B A)."""
        from megatron_mole.checkpoint.factorize import save_model
        from megatron_mole.layers.factorllm import merged_expert_adapters

        out = Path(self.cfg.checkpoint.save_dir) / f"model_step_{self.step}"
        chunks = [ddp.module for ddp in self.model]
        with merged_expert_adapters(chunks):
            save_model(chunks, self.cfg.base.checkpoint, str(out))
        return out

    # ------------------------------------------------------------------ one step
    def loss(self, micro, scale, output_BS):
        """The loss function of a micro-batch (families' forward steps return it, bound to ``micro``)."""
        losses_BS = output_BS.float()
        mask_BS = micro["loss_mask"]
        loss_sum = (losses_BS * mask_BS).sum()
        domain_loss_D, domain_tokens_D = domain_loss_sums(losses_BS, mask_BS, micro["domain_ids"],
                                                          len(self.dataset.domains))
        # clone: the schedule scales the returned loss in place
        sums = torch.cat([loss_sum.detach().clone().view(1), mask_BS.sum().view(1), domain_loss_D, domain_tokens_D])
        return loss_sum * scale, {"sums": sums}

    def _global_sums(self, reduced) -> torch.Tensor:
        """[loss_sum, tokens, loss_sum_D, tokens_D] over the global batch, on every rank."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        sums = torch.zeros(2 + 2 * len(self.dataset.domains), dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for entry in reduced:
                sums += entry["sums"].double()
            if self.dp > 1:
                dist.all_reduce(sums, group=ps.get_data_parallel_group())
        if self.info.pp > 1:
            dist.broadcast(sums, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return sums.cpu()

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_mole.routing import set_aux_loss_scale

        self.family.before_step(self)  # may rebuild the optimizer (Parrot's stage 2)
        cfg, start = self.cfg, time.perf_counter()
        global_batch = self.loader.next_global_batch()
        supervised = float(global_batch["loss_mask"].sum())
        rows = slice(self.dp_rank * self.loader.rows_per_rank, (self.dp_rank + 1) * self.loader.rows_per_rank)
        micro = split_microbatches({k: v[rows] for k, v in global_batch.items()}, cfg.parallel.micro_batch)
        scale = len(micro) * self.dp / supervised
        set_aux_loss_scale(1.0 / len(micro))
        lr = self.optimizer.param_groups[0]["lr"]

        for ddp in self.model:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        # the interleaved schedule takes one iterator per chunk; each chunk sees every micro-batch
        iterators = iter(micro) if len(self.model) == 1 else [iter(micro) for _ in self.model]
        reduced = get_forward_backward_func()(
            forward_step_func=partial(self.family.forward_step, self, scale), data_iterator=iterators,
            model=self.model, num_microbatches=len(micro), seq_length=self.family.seq_length(self),
            micro_batch_size=cfg.parallel.micro_batch,
            forward_only=False)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        update_global_balance(self.model)  # routers with balance="global": this step's fractions
        self.step += 1

        sums = self._global_sums(reduced)
        aux, load = gather_router_stats(self.monitor)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        num_domains = len(self.dataset.domains)
        domain_tokens = sums[2 + num_domains:]
        tokens = self.family.tokens(global_batch)
        return {
            "step": self.step,
            "loss": float(sums[0] / sums[1]),
            "domain_loss": {d: float(sums[2 + i] / domain_tokens[i]) for i, d in enumerate(self.dataset.domains)
                            if domain_tokens[i] > 0},
            "aux_loss": weighted_aux_loss(aux, self.mole_config),
            "aux": aux,
            "expert_load": load,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens,
            "supervised_tokens": int(supervised),
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }

    # ------------------------------------------------------------------ the job
    def announce(self, message: str):
        if self.logger is not None:
            self.logger.info(message)
        elif self.rank == 0:
            print(message, flush=True)

    def run(self) -> TrainResult:
        cfg, ck = self.cfg, self.cfg.checkpoint
        result = TrainResult(data_report=self.dataset.report)
        self.announce(self.dataset.report.summary())
        result.adapter_params = sum(p.numel() for ddp in self.model for p in ddp.parameters() if p.requires_grad)
        self.announce(self.memory_line + " (rank 0; training/memory.py)")
        self.announce(f"train: world={self.info.world_size} tp={self.info.tp} pp={self.info.pp} ep={self.info.ep} "
                   f"dp={self.dp} device={self.device.type} dtype={str(self.dtype).replace('torch.', '')} "
                   f"adapter params={result.adapter_params} (rank 0)")
        self.announce(format_trainable_summary(self.model, self.mole_config.method)
                  + " (full tensors, rank 0's pipeline stages)")
        if self.family.summary(self):
            self.announce(self.family.summary(self))
        self.resume()
        latest = ckpt_io.latest_step(ck.save_dir) if ck.save_dir else None
        if latest is not None and latest > self.step:
            raise ckpt_io.CheckpointError(
                f"checkpoint.save_dir {ck.save_dir} already holds step_{latest}, beyond this run's start (step "
                f"{self.step}); save elsewhere (--save DIR) or resume from it (--load {ck.save_dir})")
        result.start_step, result.resharded = self.step, self.resharded
        self.logger = StepLogger(cfg, rank=self.rank, start_step=self.step, max_steps=cfg.schedule.max_steps)
        try:
            while self.step < cfg.schedule.max_steps:
                record = self.train_step()
                result.records.append(record)
                if self.step % cfg.logging.interval == 0 or self.step == cfg.schedule.max_steps:
                    self.logger.log(record)
                self.logger.progress(record)
                due = ck.interval > 0 and self.step % ck.interval == 0
                if ck.save_dir and (due or self.step == cfg.schedule.max_steps):
                    result.last_checkpoint = str(self.save())
                    self.announce(f"saved {result.last_checkpoint}")
        finally:
            self.logger.close()
        result.final_step = self.step
        return result


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job ``cfg`` in this rank (all ranks call it)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.monitor.remove()
