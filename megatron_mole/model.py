"""apply_mole: wrap the target modules of a Megatron-core model with MoLE/LoRA
adapters, freeze the base; adapter_state_dict / load_adapter_state_dict.

Matching (patterns: see config.py) runs on each module's *global* path: the
local index of ``decoder.layers.{i}`` is replaced by Megatron's global
``layer_number - 1`` (in a HybridModel: the GPT layer it is half of,
runtime/hybrid.py), so targets, layer selections and adapter names are the
same at every pipeline layout and on both bases. The method (``MoLEConfig.method``, a registry in
layers/specs.py) names the adapter kind of each matched linear; a kind whose
unit is an MLP wraps the parent MLP once. For method "mole":

- ``expert_scope="mlp"``: a matched ``linear_fc1``/``linear_fc2`` of a dense
  MLP makes that MLP a :class:`MoLEMLP` (experts on the matched linears, one
  router per MLP); attention linears get a plain :class:`LoRALinear`.
- ``expert_scope="linear"``: every matched linear becomes a :class:`MoLELinear`
  with its own router.
- MoE bases: linears inside routed experts (``mlp.experts``) are out of scope
  for method "mole" (PERFT methods adapt MoE blocks): bare names skip them and an
  explicit pattern into them is an error. Shared experts (``mlp.shared_experts``)
  are supported under ``expert_scope="linear"``; under "mlp" bare names skip them.
- A pattern that matches nothing is an error naming it.

Wrappers keep the base module as child ``base`` (base parameter names gain a
``.base`` component); every base parameter gets ``requires_grad=False``. Adapter
tensors are initialised from per-tensor seeds (experts/init.py), so the same
seed gives the same full tensors at any TP/PP layout.

State dicts hold FULL tensors under global names (README "Adapter tensor
names"): TP shards are all-gathered; under PP every rank receives every
stage's tensors (moved to the CPU, then ``all_gather_object`` over a gloo group of
the pipeline ranks: host memory, not GPU memory, under NCCL), so rank 0 can save
the whole adapter. ``load_adapter_state_dict`` slices the full tensors
for the current layout.
"""
import re
from fnmatch import fnmatchcase
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from megatron_mole.config import MoLEConfig
from megatron_mole.errors import ConfigError
from megatron_mole.layers import METHODS
from megatron_mole.layers.base import AdapterWrapper, mark_parallel_attributes
from megatron_mole.layers.context import install_context_hooks
from megatron_mole.layers.parallel import fc1_stride, placement_for
from megatron_mole.layers.specs import kind_of
from megatron_mole.runtime.hybrid import canonical_layer_index, check_model, is_hybrid_stack

ATTENTION_LINEARS = ("linear_qkv", "linear_proj")


# ---------------------------------------------------------------- matching
def _component_regex(comp: str) -> str:
    out, i = "", 0
    while i < len(comp):
        ch = comp[i]
        if ch == "{":
            j = comp.index("}", i)
            alts = []
            for part in comp[i + 1:j].split(","):
                if "-" in part:
                    lo, hi = part.split("-")
                    alts += [str(v) for v in range(int(lo), int(hi) + 1)]
                else:
                    alts.append(part.strip())
            out += "(?:" + "|".join(map(re.escape, alts)) + ")"
            i = j + 1
            continue
        out += "[^.]*" if ch == "*" else re.escape(ch)
        i += 1
    return out


def pattern_matches(pattern: str, path: str) -> bool:
    """Bare names match the last component; dotted patterns match the whole
    path with ``*`` (one component or part of one), ``**`` (any number of
    components) and ``{a-b}``/``{a,b}`` (integer alternatives)."""
    if "." not in pattern and "**" not in pattern:
        return re.fullmatch(_component_regex(pattern), path.rsplit(".", 1)[-1]) is not None
    parts = []
    for comp in pattern.split("."):
        parts.append(r"(?:[^.]+\.)*" if comp == "**" else _component_regex(comp) + r"\.")
    regex = "".join(parts)
    return re.fullmatch(regex, path + ".") is not None


def global_module_paths(model: nn.Module) -> Dict[str, str]:
    """local module path -> path with global (GPT) layer indices and global expert ids (and no
    wrapper ``module.`` prefixes): the names adapters and analysis reports use. A HybridModel's
    layers map to the GPT layer they are half of (runtime/hybrid.py), so both bases share target
    patterns and adapter names."""
    modules = dict(model.named_modules())
    layer_prefix = {}
    for path, mod in modules.items():
        last = path.rsplit(".", 1)[-1]
        if last.isdigit() and path.split(".")[-2:-1] == ["layers"] and hasattr(mod, "layer_number"):
            stack = modules.get(path.rsplit(".", 2)[0])
            index = canonical_layer_index(int(mod.layer_number), hybrid=is_hybrid_stack(stack))
            layer_prefix[path] = path[: -len(last)] + str(index)
    out = {}
    for path, _ in model.named_modules():
        g = path
        for local, glob in layer_prefix.items():
            if path == local or path.startswith(local + "."):
                g = glob + path[len(local):]
                break
        while g.startswith("module."):
            g = g[len("module."):]
        out[path] = _global_expert_id(g, path, modules)
    return out


_LOCAL_EXPERT = re.compile(r"(\.experts\.local_experts\.)(\d+)(?=\.|$)")


def _global_expert_id(global_path: str, local_path: str, modules) -> str:
    """``...experts.local_experts.{i}`` with i the global expert id (Megatron numbers them per
    expert-parallel rank): rank r of the EP group holds experts [r*L, (r+1)*L)."""
    match = _LOCAL_EXPERT.search(global_path)
    if match is None:
        return global_path
    local_list = local_path[:_LOCAL_EXPERT.search(local_path).start(2) - 1]
    num_local = len(modules[local_list])
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            rank = parallel_state.get_expert_model_parallel_rank()
    return global_path[:match.start(2)] + str(rank * num_local + int(match.group(2))) + global_path[match.end(2):]


def _layer_index(global_path: str) -> Optional[int]:
    m = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", global_path)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- apply
def is_multimodal(model: nn.Module) -> bool:
    """A vision-language model (Megatron's LLaVAModel): a ``language_model`` beside a vision part."""
    return hasattr(model, "language_model") and hasattr(model, "vision_projection")


def _record_combined_padding(model, args, kwargs):
    """LLaVAModel pre-hook: the padding [b, C] of the combined (image + text) sequence its LM
    will see (under pipeline parallelism padded to the LM's max length), so that routers
    leave it out of their statistics and losses as on a GPT base."""
    ids_BS = kwargs.get("input_ids", args[1] if len(args) > 1 else None)
    if ids_BS is None:
        return
    images_B = (ids_BS == model.image_token_index).sum(-1)
    length_B = ids_BS.shape[1] + images_B * (model.img_seq_len - 1)
    padded = int(length_B.max())
    if model.config.pipeline_model_parallel_size > 1:
        padded = max(padded, model._language_max_sequence_length)
    padded = min(padded, model._language_max_sequence_length)
    positions = torch.arange(padded, device=ids_BS.device)
    model.language_model.mole_padding_mask = positions.unsqueeze(0) >= length_B.unsqueeze(1)


def apply_mole(model: nn.Module, cfg: MoLEConfig, options=None) -> nn.Module:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP

    if not isinstance(cfg, MoLEConfig):
        raise TypeError(f"apply_mole: cfg must be a MoLEConfig, got {type(cfg).__name__}")
    if is_multimodal(model):
        # LLaVA-MoLE: adapters on the language model's blocks only (names as on a GPT base);
        # the vision tower and the projector are frozen (set_projector_trainable reopens it).
        for p in model.parameters():
            p.requires_grad_(False)
        if model.language_model is not None:
            apply_mole(model.language_model, cfg, options)
            model.register_forward_pre_hook(_record_combined_padding, with_kwargs=True)
        model.mole_config = cfg
        return model
    if any(isinstance(m, AdapterWrapper) for m in model.modules()):
        raise ValueError("apply_mole: the model already has adapters")
    method = METHODS[cfg.method]
    if method.apply_model is not None:  # a whole-model method (factorllm): its own options
        model = method.apply_model(model, cfg, options)
        _mark_embedding_output(model)
        return model
    check_model(model)  # a HybridModel needs a pattern with a GPT equivalent
    method.check(cfg)
    if method.moe_kind is not None and not getattr(getattr(model, "config", None), "num_moe_experts", None):
        # the config is global, so every pipeline stage refuses alike (a stage of dense layers of
        # a mixed base such as Qwen2-MoE has num_moe_experts set and gets MoLE there, as PERFT says)
        raise ConfigError(f"MoLEConfig.method={cfg.method!r} adapts the MoE blocks of an MoE base; this base "
                          f"has no MoE layers (num_moe_experts is unset): use method 'mole'")
    gpaths = global_module_paths(model)
    modules = dict(model.named_modules())
    hits = {p: [] for p in cfg.targets}
    for path, mod in modules.items():
        if type(mod).__name__.startswith("TE") and hasattr(mod, "weight") and any(
                pattern_matches(p, gpaths[path]) for p in cfg.targets):
            raise NotImplementedError(
                f"{gpaths[path]} is Transformer Engine's {type(mod).__name__}: adapters on TE layer specs are "
                f"designed but not implemented (README 'Transformer Engine layer specs': a LoRA on "
                f"TELayerNormColumnParallelLinear must see the normalised input, return_layernorm_output); "
                f"build the base with the local spec (load_model does)")
        if not isinstance(mod, (ColumnParallelLinear, RowParallelLinear)):
            continue
        gpath = gpaths[path]
        for pattern in cfg.targets:
            if not pattern_matches(pattern, gpath):
                continue
            if cfg.layers is not None and _layer_index(gpath) not in cfg.layers:
                continue
            in_experts = ".mlp.experts." in f".{gpath}."
            in_shared = ".shared_experts." in f".{gpath}."
            if in_experts and method.adapts_moe_experts:  # PERFT: the whole MoE block is one unit;
                if method.moe_kind is None:  # CEFT: one adapter per expert linear
                    _check_expert_layout(gpath)
                hits[pattern].append(path)
                continue
            if in_shared and method.adapts_moe_experts:
                if "." not in pattern:  # the block's adapter covers its shared experts too
                    continue
                raise ConfigError(f"target {pattern!r} matches {gpath!r}, inside an MoE shared expert: method "
                                  f"{cfg.method!r} adapts whole MoE blocks (name the routed experts' "
                                  f"linear_fc1/linear_fc2)")
            if in_experts or (in_shared and cfg.expert_scope == "mlp"):
                if "." not in pattern:  # bare names skip what "mole" cannot adapt
                    continue
                raise NotImplementedError(
                    f"target {pattern!r} matches {gpath!r}, inside an MoE "
                    f"{'shared expert' if in_shared else 'routed expert'}: not supported by "
                    f"method 'mole'{' with expert_scope=mlp' if in_shared else ''}"
                    f"{'' if in_shared else ' (the perft-* methods adapt MoE blocks)'}")
            hits[pattern].append(path)
    empty = [p for p, paths in hits.items() if not paths]
    for pattern in empty:
        mlps = [gpaths[p] for p, m in modules.items() if isinstance(m, MLP)
                and pattern_matches(pattern, gpaths[p])]
        if mlps:
            raise ValueError(f"MoLEConfig.targets: {pattern!r} matches the MLP {mlps[0]!r}, not a "
                             f"linear: name its linears (linear_fc1, linear_fc2)")
    if empty:
        raise ValueError(f"MoLEConfig.targets: pattern(s) {empty} match no adapter-able module "
                         f"(Megatron Column/RowParallelLinear outside MoE experts"
                         f"{', layers ' + str(cfg.layers) if cfg.layers is not None else ''})")

    for p in model.parameters():
        p.requires_grad_(False)
    chosen = sorted({path for paths in hits.values() for path in paths})
    wrappers = []
    mlp_parts: Dict[str, set] = {}
    moe_blocks = _moe_blocks(chosen, modules, gpaths) if method.moe_kind is not None else {}
    for path in chosen:
        if any(path.startswith(block + ".experts.") for block in moe_blocks):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = modules[parent_path]
        kind = kind_of(method.kind_for(cfg, name, isinstance(parent, MLP)))
        if kind.unit == "mlp":
            mlp_parts.setdefault(parent_path, (kind, set()))[1].add(name)
            continue
        stride = fc1_stride(parent) if name == "linear_fc1" and isinstance(parent, MLP) else None
        wrapper = kind.wrapper(modules[path], cfg, placement_for(modules[path], stride))
        setattr(parent, name, wrapper)
        wrappers.append((wrapper, gpaths[path]))
    for mlp_path, (kind, names) in mlp_parts.items():
        grand_path, _, name = mlp_path.rpartition(".")
        wrapper = kind.wrapper(modules[mlp_path], cfg, "linear_fc1" in names, "linear_fc2" in names)
        setattr(modules[grand_path], name, wrapper)
        wrappers.append((wrapper, gpaths[mlp_path]))
    for block_path in moe_blocks:
        grand_path, _, name = block_path.rpartition(".")
        wrapper = kind_of(method.moe_kind).wrapper(modules[block_path], cfg)
        setattr(modules[grand_path], name, wrapper)
        wrappers.append((wrapper, gpaths[block_path]))
    for wrapper, gpath in wrappers:
        wrapper.adapter_prefix = gpath
        wrapper.layer_number = _layer_index(gpath)
        wrapper.init_adapters(cfg.seed)
        mark_parallel_attributes(wrapper)
    install_context_hooks(model)
    _mark_embedding_output(model)
    model.mole_config = cfg
    return model


def _moe_blocks(chosen: List[str], modules: Dict[str, nn.Module], gpaths: Dict[str, str]) -> Dict[str, set]:
    """MoE block path -> names of its expert linears the targets matched. A PERFT method
    adapts whole blocks: targets that match a linear in some but not all of a block's
    experts are an error naming the block."""
    blocks: Dict[str, set] = {}
    for path in chosen:
        if ".experts." in path:
            block, _, rest = path.partition(".experts.")
            blocks.setdefault(block, set()).add(rest.rsplit(".", 1)[-1])
    picked = set(chosen)
    for block, names in blocks.items():
        for path in modules:
            if path.startswith(block + ".experts.") and path.rsplit(".", 1)[-1] in names and path not in picked:
                raise ConfigError(f"MoLEConfig.targets: they match some experts of the MoE block "
                                  f"{gpaths[block]!r} but not {gpaths[path]!r}; a PERFT method adapts whole "
                                  f"blocks: name the experts' linears by bare name ({sorted(names)}) or "
                                  f"'{gpaths[block]}.experts.**'")
    return blocks


def _check_expert_layout(gpath: str) -> None:
    """Adapters inside routed experts are placed at expert-parallel and expert-TP size 1 only:
    their tensors then live on every data-parallel rank like the other adapters (state dicts
    gather over pipeline stages only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    if ep > 1 or etp > 1:
        raise NotImplementedError(f"adapting {gpath!r} inside routed MoE experts needs expert-parallel and "
                                  f"expert-tensor-parallel size 1 (got ep={ep}, etp={etp})")


def _mark_embedding_output(model) -> None:
    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, nn.Module):
        embedding.register_forward_hook(_embedding_output_requires_grad)


def _embedding_output_requires_grad(module, args, output):
    """Full activation recompute (Megatron's reentrant ``tensor_parallel.checkpoint``)
    returns outputs that require grad only when an *input* does; with the base frozen the
    first layer's input (the embedding output) does not, so every adapter of a
    recomputed chunk would silently get no gradient (the PEFT + recompute failure).
    Marking the embedding output costs one extra input-gradient of the first layer."""
    config = getattr(module, "config", None)
    if (getattr(config, "recompute_granularity", None) == "full" and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor) and not output.requires_grad):
        return output.detach().requires_grad_(True)
    return output


# ---------------------------------------------------------------- state dicts
def _chunks(model) -> List[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def adapter_wrappers(model) -> List[AdapterWrapper]:
    return [m for chunk in _chunks(model) for m in chunk.modules() if isinstance(m, AdapterWrapper)]


def _pp_group():
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_pipeline_model_parallel_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def _gather_over_pp(obj):
    group = _pp_group()
    if group is None:
        return [obj]
    from megatron_mole.runtime import cpu_group

    out = [None] * torch.distributed.get_world_size(group)
    # Through a gloo group over the same ranks: under NCCL, all_gather_object would pickle each
    # stage's adapter into a CUDA byte tensor and hold every stage's bytes on every GPU.
    torch.distributed.all_gather_object(out, obj, group=cpu_group(group))
    return out


def _merge_over_pp(local: Dict) -> Dict:
    """One dict of every pipeline stage's ``local`` entries, on every rank."""
    merged = {}
    for part in _gather_over_pp(local):
        merged.update(part)
    return merged


def adapter_state_dict(model) -> Dict[str, torch.Tensor]:
    """Full adapter tensors (CPU) of every pipeline stage, on every rank."""
    local = {}
    for w in adapter_wrappers(model):
        local.update({k: v.cpu() for k, v in w.full_adapter_tensors().items()})
    return dict(sorted(_merge_over_pp(local).items()))


def load_adapter_state_dict(model, sd: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full adapter tensors at the current layout (each rank slices its
    shard). With ``strict``, names that belong to no adapter of any pipeline
    stage are an error too."""
    errors: List[str] = []
    local_names = []
    for w in adapter_wrappers(model):
        w.load_full_adapter_tensors(sd, errors)
        local_names += [w.adapter_name(t) for t in w.adapter_tensors()]
    if strict:
        known = {n for names in _gather_over_pp(local_names) for n in names}
        errors += [f"unexpected tensor {k!r}" for k in sorted(set(sd) - known)]
    if errors:
        raise ValueError("load_adapter_state_dict: " + "; ".join(errors))


def trainable_summary(model) -> Dict[str, int]:
    """Trainable adapter parameters per adapter kind, full tensors (unsharded), of the
    adapters this rank's pipeline stages hold; read from the kinds' specs, no communication."""
    out: Dict[str, int] = {}
    for w in adapter_wrappers(model):
        for t in kind_of(w.kind).tensors(w.cfg, w.unit_dims()):
            if t.trainable and w.param_of(t.name) is not None:
                n = 1
                for size in t.shape:
                    n *= size
                out[w.kind] = out.get(w.kind, 0) + n
    return out


def format_trainable_summary(model, method: Optional[str] = None) -> str:
    """One line: the method and ``trainable_summary``."""
    counts = trainable_summary(model)
    method = method or getattr(getattr(model, "mole_config", None), "method", "?")
    parts = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    return f"adapter: method {method}, trainable parameters {sum(counts.values()):,} ({parts})"


def adapter_parameters(model) -> Iterable[nn.Parameter]:
    """The trainable adapter parameters (router state such as the balance fractions excluded)."""
    for w in adapter_wrappers(model):
        for t in w.adapter_tensors():
            if t.param.requires_grad:
                yield t.param


@torch.no_grad()
def update_global_balance(model) -> None:
    """Close an optimizer step for routers with ``MoLEConfig.balance="global"``: sum the
    step's routing statistics over the data-parallel ranks (one all-reduce for all
    routers of this rank's stages) and make them the fractions the balance loss uses
    next step. Call it once per optimizer step (``megatron-mole train`` does); routers
    whose step saw no training forward keep their fractions."""
    from megatron_mole.routing import Router

    routers = [m for w in adapter_wrappers(model) for m in w.modules()
               if isinstance(m, Router) and m.cfg.balance == "global"]
    if not routers:
        return
    flat = torch.cat([torch.cat([r._balance_sum, r._balance_n.view(1)]) for r in routers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
            torch.distributed.all_reduce(flat, group=group)
    for router, part in zip(routers, flat.split([r.num_experts + 1 for r in routers])):
        sum_E, total = part[:-1], part[-1]
        # where(): no host sync; a router without training forwards this step keeps its fractions
        router.balance_fraction.copy_(torch.where(total > 0, sum_E / total.clamp(min=1.0),
                                                  router.balance_fraction.float()))
        router._balance_sum.zero_()
        router._balance_n.zero_()


# ---------------------------------------------------------------- multimodal: the projector
def set_projector_trainable(model, trainable: bool = True) -> List[nn.Parameter]:
    """Make a LLaVAModel's vision projector trainable (or frozen again); returns its parameters
    on this rank (none on later pipeline stages, which do not hold it)."""
    params = []
    for chunk in _chunks(model):
        projection = getattr(chunk, "vision_projection", None)
        if projection is not None:
            for p in projection.parameters():
                p.requires_grad_(trainable)
                params.append(p)
    return params


def projector_state_dict(model) -> Dict[str, torch.Tensor]:
    """The projector's full tensors (gathered over TP; CPU) under Megatron names, on every rank."""
    from megatron.core import parallel_state as ps

    local = {}
    for chunk in _chunks(model):
        projection = getattr(chunk, "vision_projection", None)
        if projection is None:
            continue
        for name, p in projection.named_parameters():
            value = p.detach()
            if getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
                parts = [torch.empty_like(value) for _ in range(ps.get_tensor_model_parallel_world_size())]
                torch.distributed.all_gather(parts, value.contiguous(), group=ps.get_tensor_model_parallel_group())
                value = torch.cat(parts, dim=p.partition_dim)
            # A Parrot-wrapped projector keeps the projector as ``base`` (and the MoE beside it).
            if name.startswith("moe."):
                continue
            local["vision_projection." + name.removeprefix("base.")] = value.cpu()
    return _merge_over_pp(local)


def parrot_state_dict(model) -> Dict[str, torch.Tensor]:
    """Parrot's MoE tensors (replicated; CPU) under ``parrot.<name>``, on every rank (empty without Parrot)."""
    from megatron_mole.layers.parrot import parrot_module

    local = {}
    for chunk in _chunks(model):
        wrapper = parrot_module(chunk)
        if wrapper is not None:
            local.update({f"parrot.{k}": v.detach().cpu() for k, v in wrapper.moe.state_dict().items()})
    return _merge_over_pp(local)


def multimodal_parameters(model) -> Dict[str, nn.Parameter]:
    """{layout-independent name: this rank's param} of a LLaVAModel's projector
    (``vision_projection.*``, as :func:`projector_state_dict`) and Parrot's MoE (``parrot.*``, as
    :func:`parrot_state_dict`), on this rank's stages (empty on later pipeline stages); chunks may
    be wrapped (DDP)."""
    out = {}
    for chunk in _chunks(model):
        while not hasattr(chunk, "vision_projection") and hasattr(chunk, "module"):
            chunk = chunk.module
        projection = getattr(chunk, "vision_projection", None)
        for name, p in (projection.named_parameters() if projection is not None else ()):
            if name.startswith("moe."):
                out["parrot." + name[len("moe."):]] = p
            else:
                out["vision_projection." + name.removeprefix("base.")] = p
    return out


# ---------------------------------------------------------------- base MoE routers (router tuning)
def base_routers(model) -> Dict[str, nn.Module]:
    """{global name: module} of the Megatron-core MoE routers (``TopKRouter``) of this rank's stages."""
    from megatron.core.transformer.moe.router import TopKRouter

    out = {}
    for chunk in _chunks(model):
        paths = global_module_paths(chunk)
        for local, module in chunk.named_modules():
            if isinstance(module, TopKRouter):
                out[paths[local]] = module
    return out


def unfreeze_base_routers(model) -> int:
    """Freeze everything but the MoE routers' weights (trained directly); returns their count."""
    for chunk in _chunks(model):
        for p in chunk.parameters():
            p.requires_grad_(False)
    routers = base_routers(model)
    for module in routers.values():
        module.weight.requires_grad_(True)
    return len(routers)


def base_router_state_dict(model) -> Dict[str, torch.Tensor]:
    """``{global name}.weight`` of every MoE router of every pipeline stage (CPU), on every rank
    (the weights are replicated over TP, EP and DP)."""
    local = {f"{name}.weight": module.weight.detach().cpu().clone() for name, module in base_routers(model).items()}
    return dict(sorted(_merge_over_pp(local).items()))


@torch.no_grad()
def load_base_router_state_dict(model, sd: Dict[str, torch.Tensor]) -> None:
    """Copy tuned router weights (``base_router_state_dict``) into this rank's MoE routers; each of
    them must be in ``sd`` with its shape."""
    errors = []
    for name, module in base_routers(model).items():
        value = sd.get(f"{name}.weight")
        if value is None or tuple(value.shape) != tuple(module.weight.shape):
            errors.append(f"{name}.weight: {'missing' if value is None else f'shape {tuple(value.shape)}'}, "
                          f"expected {tuple(module.weight.shape)}")
        else:
            module.weight.copy_(value)
    if errors:
        raise ValueError("load_base_router_state_dict: " + "; ".join(errors))
