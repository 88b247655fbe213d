"""Training logs: router statistics gathered from every rank, and rank 0's outputs
(progress bar, JSON lines, optional TensorBoard).

Router statistics come from two places, neither of which needs the layers to know
about logging:

- auxiliary losses per MoLE layer (load balance, z-loss) from the layers' own
  ``routing.AUX_LOSS_TRACKER`` (mean over the layer's forward calls of the step);
- expert load: a forward hook on every router counts, per layer, how many
  (token, slot) assignments each expert received, leaving out padding tokens when
  the layer was given a padding mask. Counts are kept on the device (no host sync
  on the hot path) and turned into fractions when logged.

``gather_router_stats`` collects both from every rank (pipeline stages hold different
layers, data-parallel ranks see different tokens) with one ``all_gather_object``:
aux losses are averaged over the ranks that report a layer, counts are summed.
Tensor-parallel ranks of a token make the same routing decisions, so their duplicate
counts do not change the fractions.

One JSON object per logged step, e.g.::

    {"step": 3, "loss": 5.91, "domain_loss": {"math": 5.8, ...}, "aux_loss": 0.0102,
     "aux": {"decoder.layers.0.mlp": {"load_balance": 1.02}}, "expert_load":
     {"decoder.layers.0.mlp": [0.26, 0.24, 0.27, 0.23]}, "lr": 2e-4, "grad_norm": 0.41,
     "tokens": 2048, "supervised_tokens": 311, "tokens_per_s": 1830.2, "step_time_s": 1.12}

A run keeps only the last ``RECORDS_KEPT`` step records in memory (``recent_records``;
``TrainResult.records``): every rank builds a record per step and its per-layer,
per-expert fields grow with the model, so a list of all of them grew without bound
over a long run. The full history is the JSON lines log.

Legend: T tokens, K top-k, E experts.
"""
import json
import sys
from collections import deque
from pathlib import Path

import torch


RECORDS_KEPT = 16


def recent_records() -> deque:
    """An empty container for step records that keeps the last ``RECORDS_KEPT`` of them."""
    return deque(maxlen=RECORDS_KEPT)


class RouterLoadMonitor:
    """Forward hooks on every router of a model's adapter wrappers; counts expert assignments."""

    def __init__(self, model):
        from megatron_mole.model import adapter_wrappers
        from megatron_mole.routing import Router

        self.counts = {}
        self.num_experts = {}
        self._handles = []
        for wrapper in adapter_wrappers(model):
            for module in wrapper.modules():
                if isinstance(module, Router):
                    self.num_experts[wrapper.adapter_prefix] = module.num_experts
                    hook = self.counting_hook(wrapper.adapter_prefix, module.num_experts)
                    self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def counting_hook(self, layer: str, num_experts: int):
        """A router forward hook adding the expert load of ``layer`` to ``counts``."""
        from megatron_mole.routing import is_recomputing

        def count(module, args, kwargs, routing):
            if is_recomputing():  # an activation-recompute replay: counted by the first forward
                return
            expert_idx_TK = routing.expert_idx_TK.detach()
            weight_TK = None
            if routing.mask_T is not None:  # padding tokens are not load
                weight_TK = routing.mask_T.reshape(-1, 1).to(torch.float32).expand_as(expert_idx_TK)
            if routing.valid_TK is not None:  # nor are the unused slots of a variable router
                valid_TK = routing.valid_TK.to(torch.float32)
                weight_TK = valid_TK if weight_TK is None else weight_TK * valid_TK
            ones = torch.ones(expert_idx_TK.numel(), dtype=torch.float32, device=expert_idx_TK.device)
            weight = ones if weight_TK is None else weight_TK.reshape(-1)
            # index_add, not bincount: bincount syncs with the host on GPUs
            counts_E = torch.zeros(num_experts, dtype=torch.float32, device=expert_idx_TK.device)
            counts_E.index_add_(0, expert_idx_TK.reshape(-1), weight)
            previous = self.counts.get(layer)
            self.counts[layer] = counts_E.float() if previous is None else previous + counts_E.float()
        return count

    def collect(self) -> dict:
        """{layer: [count per expert]} since the last call (on the CPU), then reset."""
        out = {layer: counts_E.cpu().tolist() for layer, counts_E in self.counts.items()}
        self.counts = {}
        return out

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def gather_router_stats(monitor: RouterLoadMonitor) -> tuple:
    """(aux, expert_load) merged over all ranks; every rank must call it (a collective).

    ``aux``: {layer: {stat: mean over reporting ranks}}; ``expert_load``: {layer:
    [fraction of assignments per expert]}. Resets the tracker and the monitor.
    """
    import torch.distributed as dist

    from megatron_mole.routing import AUX_LOSS_TRACKER

    local = (AUX_LOSS_TRACKER.report(reset=True), monitor.collect())
    parts = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        from megatron_mole.runtime import cpu_group

        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local, group=cpu_group(None))  # host memory, not a CUDA buffer
    aux_sums, aux_counts, load = {}, {}, {}
    for aux, counts in parts:
        for layer, stats in aux.items():
            for key, value in stats.items():
                aux_sums.setdefault(layer, {}).setdefault(key, 0.0)
                aux_sums[layer][key] += value
                aux_counts[(layer, key)] = aux_counts.get((layer, key), 0) + 1
        for layer, counts_E in counts.items():
            total = load.setdefault(layer, [0.0] * len(counts_E))
            load[layer] = [a + b for a, b in zip(total, counts_E)]
    aux = {layer: {key: value / aux_counts[(layer, key)] for key, value in stats.items()}
           for layer, stats in sorted(aux_sums.items())}
    fractions = {}
    for layer, counts_E in sorted(load.items()):
        total = sum(counts_E)
        fractions[layer] = [c / total if total else 0.0 for c in counts_E]
    return aux, fractions


def weighted_aux_loss(aux: dict, mole_config=None) -> float:
    """Sum over layers of the routers' scaled auxiliary losses (each router reports
    its own as the ``aux_loss`` statistic: balance, z-loss, or whatever it owns)."""
    return sum(stats.get("aux_loss", 0.0) for stats in aux.values())


class StepLogger:
    """Rank 0's outputs; on other ranks every method is a no-op."""

    def __init__(self, cfg, *, rank: int, start_step: int, max_steps: int):
        self.active = rank == 0
        self.bar = self.jsonl = self.tensorboard = None
        if not self.active:
            return
        if cfg.logging.progress and start_step < max_steps:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        if cfg.logging.log_jsonl:
            path = Path(cfg.logging.log_jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Append: a resumed run continues the log of the run it resumes.
            self.jsonl = open(path, "a", encoding="utf-8")
        if cfg.logging.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("logging.tensorboard_dir is set but the tensorboard package is not installed; "
                          "TensorBoard logging is off (pip install tensorboard)")
            else:
                self.tensorboard = SummaryWriter(cfg.logging.tensorboard_dir)

    def info(self, message: str):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def progress(self, record: dict):
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}",
                             lr=f"{record['lr']:.2e}", refresh=False)
        self.bar.update(1)

    def log(self, record: dict):
        if not self.active:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            step = record["step"]
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], step)
            for domain, value in record.get("domain_loss", {}).items():
                self.tensorboard.add_scalar(f"domain_loss/{domain}", value, step)
            for layer, fractions in record.get("expert_load", {}).items():
                for expert, fraction in enumerate(fractions):
                    self.tensorboard.add_scalar(f"expert_load/{layer}/{expert}", fraction, step)

    def close(self):
        for handle in (self.bar, self.jsonl, self.tensorboard):
            if handle is not None:
                handle.close()
