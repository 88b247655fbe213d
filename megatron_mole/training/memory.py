"""Expected memory per GPU of a training job, computed from the base's shapes and the training config.

    python -m megatron_mole.training.memory --hf-config BASE/config.json --config job.yaml --world-size 16

Counted per rank, for the first and the last pipeline stage (the largest two):

- **base weights**: embedding (first stage) and output layer (last stage, vocabulary padded
  to a multiple of 128 x TP as the converter does), attention, dense MLP or MoE experts
  (split over EP x expert-TP) and norms of ``num_layers / pp`` layers, in the run's dtype
  (bf16 on GPUs); frozen, so no gradient or optimizer state;
- **adapters**: exactly the tensors ``apply_mole`` creates on this rank (routers fp32, the
  rest in the run's dtype; TP splits as layers/parallel.py; LoRA experts split over EP under
  ``dispatch: alltoall``), their fp32 gradient buffer (Megatron DDP, ``grad_reduce_in_fp32``)
  and optimizer state (Adam moments, 8 bytes, plus a 4-byte fp32 main copy of bf16 params),
  sharded over the data-parallel group (expert-data-parallel for sharded experts) by the
  distributed optimizer;
- **activations** autograd keeps for one micro-batch in one layer, assuming every input of
  every linear is kept (an upper bound where a frozen linear's input is shared by no adapter),
  with ``base.attention: local`` the unfused attention of Megatron's local spec (one
  [heads/tp, s, s] probability tensor per layer), with ``sdpa`` (the default) only its fp32
  log-sum-exp per query (torch's flash / memory-efficient kernels on GPUs; on CPU torch's
  math path may still build the probabilities transiently), times the micro-batches 1F1B holds in flight on the stage
  (``min(pp - stage, num_microbatches)``; interleaved: Megatron's warm-up count of chunk
  micro-batches, ``2 (pp - stage - 1) + (vpp - 1) pp + 1``, each ``1/vpp`` of the stage's
  layers); sequence parallelism divides the hidden-sized ones
  by TP; MoLE adds the expert-sorted copy of the MLP input, its K-row fc1/activation tensors,
  r-dim LoRA activations and fp32 router logits/probabilities. ``parallel.recompute``:
  ``selective`` drops the attention probabilities (recomputed); ``full`` keeps only the input
  of each recomputed chunk (uniform: every ``recompute_num_layers`` layers; block: the first
  ``recompute_num_layers`` layers of the stage, the others keep everything) plus, once, the
  activations of the chunk being recomputed in backward;
- **logits** on the last stage: the output in the run's dtype plus fp32 for the cross entropy.

Not included (add them from your cluster's experience): the CUDA context, NCCL buffers,
allocator fragmentation, Megatron's sequence-parallel all-gather buffer. Target names are
the bare Megatron names (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``).

Legend: H hidden, F ffn, L layers, V vocabulary, E experts, r rank, T tokens per micro-batch.
"""
import argparse
import json
import math
from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Shapes:
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    base_experts: int = 0  # MoE bases: routed experts per layer (0: dense)
    expert_ffn: int = 0
    base_top_k: int = 0

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def shapes_from_hf_config(hf: dict) -> Shapes:
    """Shapes of a Llama/Mistral/Qwen2 (dense) or Mixtral-style (MoE) ``config.json``."""
    heads = hf["num_attention_heads"]
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    return Shapes(hidden=hf["hidden_size"], ffn=hf["intermediate_size"], layers=hf["num_hidden_layers"],
                  heads=heads, kv_heads=hf.get("num_key_value_heads") or heads,
                  head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab=hf["vocab_size"],
                  tied=bool(hf.get("tie_word_embeddings", False)), base_experts=experts,
                  expert_ffn=hf.get("moe_intermediate_size") or hf["intermediate_size"] if experts else 0,
                  base_top_k=hf.get("num_experts_per_tok", 0) if experts else 0)


def padded_vocab(vocab: int, tp: int, divisor: int = 128) -> int:
    return math.ceil(vocab / (divisor * tp)) * divisor * tp


def base_linears(shapes: Shapes) -> dict:
    """The adaptable linears of one Megatron layer: name -> (placement kind, full in, full out,
    inside a dense MLP). Routed MoE experts: the PERFT methods adapt the whole block
    (``adapter_params_per_layer``)."""
    qkv = shapes.q_dim + 2 * shapes.kv_dim
    out = {"linear_qkv": ("column", shapes.hidden, qkv, False),
           "linear_proj": ("row", shapes.q_dim, shapes.hidden, False)}
    if not shapes.base_experts:
        out.update({"linear_fc1": ("column", shapes.hidden, 2 * shapes.ffn, True),
                    "linear_fc2": ("row", shapes.ffn, shapes.hidden, True)})
    return out


def adapter_params_per_layer(shapes: Shapes, mole, tp: int, ep: int) -> dict:
    """{"dense": n, "router": n, "expert": n} adapter elements of one layer on one rank,
    from the adapter kinds' specs (layers/specs.py) exactly as ``apply_mole`` builds them.

    ``router`` params are fp32; ``expert`` params are sharded over EP (alltoall) and
    reduce over expert-data-parallel ranks; ``dense`` are the rest.
    """
    from megatron_mole.layers import METHODS
    from megatron_mole.layers.specs import UnitDims, kind_of

    linears = base_linears(shapes)
    unknown = [t for t in mole.targets if t not in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")]
    if unknown:
        raise ValueError(f"the memory estimate understands bare target names; got {unknown}")
    method = METHODS[mole.method]
    units = {}  # (kind, unit) -> [linear names]
    moe_targets = [t for t in mole.targets if t in ("linear_fc1", "linear_fc2")] if shapes.base_experts else []
    for target in mole.targets:
        if target not in linears:
            continue
        kind = kind_of(method.kind_for(mole, target, linears[target][3]))
        units.setdefault((kind.name, "mlp" if kind.unit == "mlp" else target), []).append(target)
    ep_size = ep if (mole.dispatch == "alltoall" and ep > 1) else 1
    out = {"dense": 0, "router": 0, "expert": 0}
    for (kind_name, _), names in units.items():
        kind = kind_of(kind_name)
        if kind.unit == "mlp":
            dims = UnitDims(tuple((n, linears[n][1:3]) for n in sorted(names)))
        else:
            dims = UnitDims.linear(*linears[names[0]][1:3])
        for t in kind.tensors(mole, dims):
            if not t.trainable:  # router state (a few floats): no gradient, no optimizer state
                continue
            placement = linears[t.linear or kind.input_linear or names[0]][0]
            n = t.local_numel(placement, tp, ep_size)
            out["router" if t.router else "expert" if t.experts and ep_size > 1 else "dense"] += n
    if moe_targets and method.adapts_moe_experts:  # a PERFT method: one unit per MoE block
        from megatron_mole.layers.perft import MoEDims

        kind = kind_of(method.moe_kind)
        for t in kind.tensors(mole, MoEDims.block(shapes.hidden, shapes.base_experts)):
            if not t.trainable:
                continue
            # PERFT-E lives with its base expert (always split over EP, rank dim over expert TP);
            # S/D/R are replicated over TP, R's experts split over EP under alltoall
            e_split = ep if kind.name == "perft_e" else ep_size
            placement = {"lora_a": "column", "lora_b": "row"}.get(t.linear, "none")
            n = t.local_numel(placement, tp, e_split)
            out["router" if t.router else "expert" if t.experts and e_split > 1 else "dense"] += n
    return out


def trainable_params(shapes: Shapes, mole) -> int:
    """Trainable adapter parameters of the whole model (full tensors, every layer the
    config adapts): what the PERFT paper's tables count."""
    per_layer = sum(adapter_params_per_layer(shapes, mole, 1, 1).values())
    layers = shapes.layers if mole.layers is None else len([i for i in mole.layers if i < shapes.layers])
    return per_layer * layers


def _layers_of_stage(shapes: Shapes, mole, pp: int, stage: int) -> int:
    per_stage = shapes.layers // pp
    if mole.layers is None:
        return per_stage
    return sum(1 for i in mole.layers if stage * per_stage <= i < (stage + 1) * per_stage)


def estimate(shapes: Shapes, cfg, world_size: int, dtype_bytes: int = 2) -> dict:
    """{"first stage": {...}, "last stage": {...}} byte counts per rank (see the module docstring)."""
    from megatron_mole.config import MoLEConfig

    p = cfg.parallel
    mole = MoLEConfig(**cfg.mole)
    tp, pp, ep = p.tp, p.pp, p.ep
    dp = p.data_parallel_size(world_size)
    etp = tp
    expert_dp = world_size // (pp * ep * etp)
    num_micro = p.global_batch // (p.micro_batch * dp)
    H, F, s, b = shapes.hidden, shapes.ffn, cfg.data.seq_length, p.micro_batch
    T, d, sp = s * b, dtype_bytes, (p.sequence_parallel or (shapes.base_experts and tp > 1))
    hid = H / tp if sp else H
    opt_div = dp if cfg.optimizer.distributed else 1
    exp_div = expert_dp if cfg.optimizer.distributed else 1
    main_copy = 4 if d < 4 else 0

    # per-layer quantities
    attn_w = H * (shapes.q_dim + 2 * shapes.kv_dim) // tp + shapes.q_dim * H // tp + 2 * H
    if shapes.base_experts:
        mlp_w = shapes.base_experts * 3 * H * shapes.expert_ffn // (ep * etp) + shapes.base_experts * H
    else:
        mlp_w = 3 * H * F // tp
    ad = adapter_params_per_layer(shapes, mole, tp, ep)
    K, E, r = mole.top_k, mole.num_experts, mole.rank
    act = d * T * (2 * hid + (shapes.q_dim + 2 * shapes.kv_dim + 2 * shapes.q_dim + shapes.q_dim) / tp)
    local_attention = getattr(cfg.base, "attention", "local") == "local"
    if local_attention and p.recompute != "selective":
        act += d * b * (shapes.heads / tp) * s * s  # the probabilities, kept for backward
    elif not local_attention:
        act += 4 * b * (shapes.heads / tp) * s  # log-sum-exp per query
    act += d * T * 2 * hid
    if shapes.base_experts:
        k = shapes.base_top_k
        act += d * T * k * (H + 3 * shapes.expert_ffn / etp) + 4 * T * shapes.base_experts * 2
        if mole.method in ("perft-r", "perft-s", "perft-d"):  # the gathered input, its K rows, r-dim rows
            act += d * T * (H + mole.top_k * (H + r)) + 4 * T * E * 2
        elif mole.method == "perft-e":
            act += d * T * k * r
    elif mole.expert_scope == "mlp" and any(t in mole.targets for t in ("linear_fc1", "linear_fc2")):
        act += d * T * K * (H + 3 * F / tp + 4 * r) + 4 * T * E * 2
    else:
        act += d * T * 3 * F / tp
    lora_linears = sum(t in mole.targets for t in ("linear_qkv", "linear_proj"))
    act += d * T * 2 * r * lora_linears * (K if mole.expert_scope == "linear" else 1)

    vocab = padded_vocab(shapes.vocab, tp)
    out = {}
    for name, stage in (("first stage", 0), ("last stage", pp - 1)):
        layers = shapes.layers // pp
        adapted = _layers_of_stage(shapes, mole, pp, stage)
        base = layers * (attn_w + mlp_w)
        if stage == 0:
            base += vocab * H // tp
        if stage == pp - 1:
            base += H + (0 if shapes.tied and pp == 1 else vocab * H // tp)
        dense, router, expert = (adapted * ad[k] for k in ("dense", "router", "expert"))
        if p.vpp not in (None, 1):  # interleaved: warm-up micro-batches of one chunk (layers / vpp) each
            warmup = 2 * (pp - stage - 1) + (p.vpp - 1) * pp
            in_flight = min(warmup + 1, num_micro * p.vpp) / p.vpp
        else:
            in_flight = min(pp - stage, num_micro)
        per_micro, transient = layers * act, 0.0
        if p.recompute == "full":
            n = p.recompute_num_layers or 1
            checkpoint = d * T * hid  # a recomputed chunk keeps its input only
            if (p.recompute_method or "uniform") == "uniform":
                per_micro, transient = math.ceil(layers / n) * checkpoint, min(n, layers) * act
            else:
                kept = min(n, layers)
                per_micro, transient = kept * checkpoint + (layers - kept) * act, (act if kept else 0.0)
        entry = {
            "base_weights": base * d,
            "adapter_params": (dense + expert) * d + router * 4,
            "adapter_grads": (dense + expert + router) * 4,
            "optimizer_states": (dense * (8 + main_copy) + router * 8) / opt_div + expert * (8 + main_copy) / exp_div,
            "activations": per_micro * in_flight + transient,
            "logits": (d + 4) * T * vocab / tp if stage == pp - 1 else 0,
            "adapter_param_count": dense + router + expert,
        }
        entry["total"] = sum(v for k, v in entry.items() if k != "adapter_param_count")
        out[name] = entry
    out["trainable_params"] = trainable_params(shapes, mole)
    out["method"] = mole.method
    out["layout"] = {"world_size": world_size, "tp": tp, "pp": pp, "ep": ep, "dp": dp, "expert_dp": expert_dp,
                     "micro_batches": num_micro, "sequence_parallel": bool(sp), "dtype_bytes": d}
    return out


# What to change when a term is the biggest one.
ADVICE = {
    "activations": "set parallel.recompute: full (or selective), base.attention: sdpa, a smaller "
                   "parallel.micro_batch or data.seq_length, or a larger parallel.tp (with sequence_parallel) or pp",
    "base_weights": "raise parallel.tp or parallel.pp (parallel.ep for an MoE base), or train in bf16",
    "logits": "lower parallel.micro_batch or data.seq_length, or raise parallel.tp",
    "optimizer_states": "set optimizer.distributed: true or use more data-parallel ranks",
    "adapter_params": "lower mole.rank or mole.num_experts, or shard the experts (parallel.ep, mole.dispatch: alltoall)",
    "adapter_grads": "lower mole.rank or mole.num_experts, or shard the experts (parallel.ep, mole.dispatch: alltoall)",
}
LIMIT_ENV = "MEGATRON_MOLE_MEMORY_LIMIT_GIB"  # overrides the detected device memory (GiB per rank)


def available_memory(device, local_ranks: int = 1):
    """(bytes one rank may use, where the figure comes from): ``$MEGATRON_MOLE_MEMORY_LIMIT_GIB``,
    else the GPU's total memory, else on CPU ``MemAvailable`` of /proc/meminfo shared by the
    ``local_ranks`` processes of this node; (None, reason) when unknown."""
    import os

    import torch

    if os.environ.get(LIMIT_ENV):
        return float(os.environ[LIMIT_ENV]) * GIB, f"${LIMIT_ENV}"
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), "the GPU's memory"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    kib = float(line.split()[1])
                    return kib * 1024 / max(1, local_ranks), f"MemAvailable / {local_ranks} ranks on this node"
    except OSError:
        pass
    return None, "no /proc/meminfo"


def check_fits(entry: dict, available: float, source: str, rank: int, stage: str) -> str:
    """The one-line estimate of ``entry`` (one stage of :func:`estimate`); raises ConfigError
    naming the biggest term and what to change when the total exceeds ``available`` bytes."""
    from megatron_mole.errors import ConfigError

    terms = {k: v for k, v in entry.items() if k not in ("total", "adapter_param_count")}
    biggest = max(terms, key=terms.get)
    line = (f"memory estimate for rank {rank} ({stage}): {entry['total'] / GIB:.2f} GiB, "
            f"the biggest term {biggest} {terms[biggest] / GIB:.2f} GiB")
    if available is not None and entry["total"] > available:
        raise ConfigError(f"{line}, exceeds the {available / GIB:.2f} GiB available ({source}): "
                          f"{ADVICE[biggest]}")
    return line + ("" if available is None else f" (of {available / GIB:.2f} GiB available, {source})")


def format_estimate(result: dict) -> str:
    layout = result["layout"]
    lines = ["layout: " + ", ".join(f"{k}={v}" for k, v in layout.items())]
    for name in ("first stage", "last stage"):
        entry = result[name]
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in entry.items() if k not in ("total", "adapter_param_count"))
        lines.append(f"{name}: {entry['total'] / GIB:.1f} GiB per GPU ({parts} GiB; "
                     f"{entry['adapter_param_count'] / 1e6:.1f}M adapter params on the rank)")
    lines.append(f"trainable adapter parameters ({result['method']}, whole model): "
                 f"{result['trainable_params']:,} ({result['trainable_params'] / 1e6:.1f}M)")
    lines.append("not included: CUDA context, NCCL buffers, allocator fragmentation")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--hf-config", required=True, help="the base's Hugging Face config.json")
    parser.add_argument("--config", required=True, help="training YAML")
    parser.add_argument("--world-size", type=int, required=True, help="nodes x GPUs per node")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="2 for bf16 (GPUs), 4 for fp32")


def run(args) -> int:
    from megatron_mole.errors import ConfigError
    from megatron_mole.training.train_config import load_train_config

    with open(args.hf_config, encoding="utf-8") as handle:
        try:
            hf = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{args.hf_config}: not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{args.hf_config}: expected a JSON object (a Hugging Face config.json)")
    try:
        shapes = shapes_from_hf_config(hf)
    except KeyError as error:
        raise ConfigError(f"{args.hf_config}: {error.args[0]!r} is missing (a Hugging Face config.json "
                          f"of a Llama/Mistral/Qwen2/Mixtral-style model)") from None
    print(format_estimate(estimate(shapes, load_train_config(args.config), args.world_size, args.dtype_bytes)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mole.training.memory", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from megatron_mole.errors import run_command

    return run_command(parser.prog, run, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
