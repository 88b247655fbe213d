"""Record the routing decisions of a model's routers with forward hooks, per domain.

Two kinds of routers are recorded, each under its global module name (layer indices as
``megatron_mole.model`` names them, the same at every pipeline layout):

- MoLE routers (``megatron_mole.routing.Router`` inside an adapter wrapper): their
  ``Routing`` (chosen experts, used slots, full probabilities);
- the frozen routers of Megatron-core MoE layers (``TopKRouter``: Mixtral, Qwen2-MoE):
  the chosen experts are its ``routing_map``; the probabilities are the softmax of its
  logits (recomputed from its input, which costs one small matmul; for a sigmoid score
  function the normalised sigmoid scores).

Rows reach a router s-major (``row = s * batch + b``). A router that sees the whole
sequence is counted on tensor-parallel rank 0 only (its TP peers saw the same tokens); one
that sees a sequence-parallel chunk (Megatron's MoE router under sequence parallelism) is
counted on every TP rank, each for its chunk. Data-parallel ranks see different rows and
pipeline stages different layers, so summing every rank's sums (``gather_sums``) counts
each (token, router) once.

Legend: S sequence, B batch rows, T = S*B tokens, K slots, E experts.
"""
import torch

from megatron_mole.analysis.stats import add_sums, routing_sums


def _megatron_router_class():
    try:
        from megatron.core.transformer.moe.router import TopKRouter
    except ImportError:  # pragma: no cover - megatron-core always ships it
        return None
    return TopKRouter


def _export_name(wrapper, sub: str) -> str:
    """A MoLE router's name as its exported tensors have it (``decoder.layers.0.mlp.mole.router``),
    apart from a base MoE router's (``decoder.layers.0.mlp.router``)."""
    path = sub + "."
    for exported, attribute in wrapper.param_rewrites.items():
        if path.startswith(attribute):
            path = exported + path[len(attribute):]
            break
    return f"{wrapper.adapter_prefix}.{path.rstrip('.')}"


class RoutingRecorder:
    """Hooks on every router of ``chunks``; ``set_batch(domain_BS)`` before each forward.

    ``sums[name]``: additive statistics (analysis/stats.py) of the router ``name``;
    ``kinds[name]``: "mole" or "moe" (a frozen base router)."""

    def __init__(self, chunks, num_domains: int, tp_rank: int = 0, tp_size: int = 1):
        from megatron_mole.model import adapter_wrappers, global_module_paths
        from megatron_mole.routing import Router

        self.num_domains, self.tp_rank, self.tp_size = num_domains, tp_rank, tp_size
        self.domain_SB = None
        self.sums, self.kinds = {}, {}
        self.handles = []
        chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        for wrapper in adapter_wrappers(chunks):
            for sub, module in wrapper.named_modules():
                if isinstance(module, Router):
                    self._hook(module, _export_name(wrapper, sub), "mole")
        moe_router = _megatron_router_class()
        for chunk in chunks:
            paths = global_module_paths(chunk)
            for local, module in chunk.named_modules():
                if moe_router is not None and isinstance(module, moe_router):
                    self._hook(module, paths[local], "moe")

    def _hook(self, module, name: str, kind: str):
        self.kinds[name] = kind
        handler = self._on_mole if kind == "mole" else self._on_moe
        self.handles.append(module.register_forward_hook(
            lambda mod, args, output, _name=name: handler(_name, mod, args, output)))

    def set_batch(self, domain_BS: torch.Tensor):
        """Domain id of every token of the next forward ([B, S]; -1: not counted, e.g. padding)."""
        self.domain_SB = domain_BS.t().contiguous()

    def _domains(self, rows: int):
        """domain_T for a router call of ``rows`` rows, or None when this rank does not count it."""
        S, B = self.domain_SB.shape
        if rows == S * B:
            return self.domain_SB.reshape(-1) if self.tp_rank == 0 else None
        if rows * self.tp_size == S * B:  # a sequence-parallel chunk
            chunk = S // self.tp_size
            return self.domain_SB[self.tp_rank * chunk:(self.tp_rank + 1) * chunk].reshape(-1)
        raise ValueError(f"a router saw {rows} rows; the batch has {S}x{B} tokens (tp={self.tp_size})")

    def _add(self, name, expert_idx_TK, probs_TE, valid_TK):
        domain_T = self._domains(expert_idx_TK.shape[0])
        if domain_T is None:
            return
        sums = routing_sums(expert_idx_TK, domain_T, self.num_domains, probs_TE.shape[-1], probs_TE, valid_TK)
        self.sums[name] = add_sums(self.sums.get(name), sums)

    def _on_mole(self, name, module, args, routing):
        self._add(name, routing.expert_idx_TK, routing.probs_TE, routing.valid_TK)

    @torch.no_grad()
    def _on_moe(self, name, module, args, output):
        _, routing_map_TE = output
        x = args[0]
        logits_TE = module.gating(x).reshape(-1, routing_map_TE.shape[-1]).float()
        if getattr(module.config, "moe_router_score_function", "softmax") == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
        k = max(int(routing_map_TE.sum(-1).max()), 1) if routing_map_TE.numel() else 1
        chosen_TK, expert_idx_TK = routing_map_TE.float().topk(k, dim=-1)
        self._add(name, expert_idx_TK, probs_TE, chosen_TK > 0)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def gather_sums(sums: dict) -> dict:
    """Every rank's sums added up (all ranks get the total); unchanged without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(sums)
    from megatron_mole.runtime import cpu_group

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: {n: t.cpu() for n, t in v.items()} for k, v in sums.items()},
                           group=cpu_group())
    total = {}
    for part in parts:
        for name, value in part.items():
            total[name] = add_sums(total.get(name), value)
    return dict(sorted(total.items()))
