"""`megatron-mole factorize`: a converted dense base -> a FactorLLM MoE base (DESIGN §6).

Every dense SwiGLU MLP (fc1 = [gate; up] of F rows, fc2 of F columns) becomes Megatron's
own ``MoELayer`` with N SequentialMLP experts of m = F/N neurons and FactorLLM's router
(layers/factorllm.py). Expert e holds the neurons ``perm[e*m:(e+1)*m]``: their gate and
up rows and their down-projection columns, copied exactly. A SwiGLU FFN is a sum over
its neurons, so with all N experts chosen (``--top-k N``: weight N/K = 1) the factorised
model computes the dense model's function; only the summation order of fc2 differs
(tested: logits within 1e-5).

Splits (``perm``):

- ``contiguous``: neuron order (FactorLLM's public code: expert e = rows [e*m, (e+1)*m)).
- ``clustered``: balanced k-means on the neurons' weights. Each neuron j is described by
  ``v_j = [gate_j/|gate_j|, up_j/|up_j|, down_j/|down_j|] / sqrt(3)`` (a unit vector:
  what it reads and what it writes); N centroids start at N neurons drawn with ``seed``;
  each of ``CLUSTER_ITERS`` rounds assigns the (neuron, centroid) pairs greedily in order
  of decreasing cosine similarity, each centroid taking at most m neurons (so every
  expert gets exactly m), then moves each centroid to its members' normalised mean;
  it stops early when the assignment no longer changes. Experts are ordered by their
  smallest neuron index, neurons within an expert ascending. Deterministic.

The router (Linear(D, N) with bias, fp32) starts like ``torch.nn.Linear``: uniform in
±1/sqrt(D), drawn per layer from ``seed`` (FactorLLM trains it with the PA loss).

The output is a converted checkpoint like ``convert``'s (``mcore_config.json`` with a
``factorllm`` section, ``dist_ckpt/``, ``hf/``) and loads at any TP/PP/EP with
``load_model``. It is written to a temporary directory and renamed into place; bad input
(N not dividing F, an MoE or biased base, a missing checkpoint, an existing output) is an
error before anything is written. The dense model and the factorised one are each held
in memory once (one process, tp=pp=ep=1).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Dict

import torch

from megatron_mole.checkpoint.convert import _barrier, shared_output_dir
from megatron_mole.checkpoint.hf_io import copy_side_files, dtype_from_name, dtype_name
from megatron_mole.checkpoint.mcore import DIST_DIR, HF_DIR, SPEC_NAME, build_model, conversion_runtime, \
    load_model, read_spec
from megatron_mole.errors import CheckpointError, ConfigError

__all__ = ["factorize", "factorised_spec", "neuron_split", "save_model", "SPLITS", "add_arguments", "run"]

SPLITS = ("contiguous", "clustered")
HF_WEIGHTS = "model.safetensors"
CLUSTER_ITERS = 20


def _need(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def factorised_spec(spec: Dict, num_experts: int, top_k: int, split: str, seed: int) -> Dict:
    """The spec of the factorised model; refuses what FactorLLM cannot factorise exactly."""
    t = spec["transformer"]
    if spec.get("factorllm"):
        raise CheckpointError("this checkpoint is already factorised (mcore_config.json has a 'factorllm' section)")
    if spec.get("mlp_kind") != "dense" or t.get("num_moe_experts"):
        raise CheckpointError(f"factorize needs a dense base; this one is {spec.get('mlp_kind')!r} with "
                              f"{t.get('num_moe_experts')} experts")
    if not t.get("gated_linear_unit") or spec.get("activation") != "silu":
        raise CheckpointError("factorize needs a SwiGLU MLP (gated_linear_unit with silu)")
    if t.get("add_bias_linear"):
        raise CheckpointError("factorize: the base's MLP has biases (add_bias_linear); the down-projection "
                              "bias cannot be split over experts exactly")
    ffn = t["ffn_hidden_size"]
    _need(isinstance(num_experts, int) and num_experts >= 1, f"--experts={num_experts!r}: must be an int >= 1")
    _need(ffn % num_experts == 0,
          f"--experts={num_experts} does not divide the base's ffn_hidden_size={ffn} (intermediate_size)")
    _need(isinstance(top_k, int) and 1 <= top_k <= num_experts,
          f"--top-k={top_k!r}: must be in [1, --experts={num_experts}]")
    _need(split in SPLITS, f"--split={split!r}: must be one of {', '.join(SPLITS)}")
    out = copy.deepcopy(spec)
    out["mlp_kind"] = "factorllm"
    out["transformer"].update(
        num_moe_experts=num_experts, moe_ffn_hidden_size=ffn // num_experts, moe_router_topk=top_k,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False, moe_router_dtype="fp32")
    out["shapes"]["num_experts"] = num_experts
    out["factorllm"] = {"num_experts": num_experts, "top_k": top_k, "split": split, "seed": seed,
                        "dense_ffn_hidden_size": ffn, "output_scale": num_experts / top_k}
    if out.get("hf"):  # what `convert mcore-to-hf` writes: one file of the factorised tensors
        from megatron_mole.checkpoint.convert import rule_instances

        keys = [k for inst in rule_instances(out, "per_expert") for k in inst.hf]
        out["hf"].update(weight_map={k: HF_WEIGHTS for k in keys}, indexed=False, index_metadata=None,
                         dtypes={k: spec["params_dtype"] for k in keys}, expert_layout="per_expert")
    return out


def hf_config(config: Dict, fl: Dict) -> Dict:
    """The Hugging Face config.json of a factorised model: the dense base's, plus a
    ``factorllm`` section that ``megatron_mole.hf.load_factorllm`` reads."""
    config = dict(config)
    config["factorllm"] = {"num_experts": fl["num_experts"], "top_k": fl["top_k"],
                           "expert_intermediate_size": fl["dense_ffn_hidden_size"] // fl["num_experts"],
                           "split": fl["split"]}
    return config


def _write_side_files(src_dir: str, dst_dir: str, fl: Dict) -> None:
    src = os.path.join(src_dir, HF_DIR)
    if not os.path.isdir(src):
        return
    dst = os.path.join(dst_dir, HF_DIR)
    copy_side_files(src, dst)
    path = os.path.join(dst, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = hf_config(json.load(f), fl)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)


def neuron_split(gate_FD: torch.Tensor, up_FD: torch.Tensor, down_DF: torch.Tensor, num_experts: int,
                 split: str, seed: int = 0) -> torch.Tensor:
    """The neuron permutation [F]: expert e holds ``perm[e*m:(e+1)*m]`` (module docstring)."""
    ffn = gate_FD.shape[0]
    if split == "contiguous" or num_experts == 1:
        return torch.arange(ffn)
    m = ffn // num_experts
    feats = torch.cat([_unit_rows(gate_FD.double()), _unit_rows(up_FD.double()),
                       _unit_rows(down_DF.t().double())], dim=1) / math.sqrt(3.0)
    gen = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(ffn, generator=gen)[:num_experts]]
    assign = None
    for _ in range(CLUSTER_ITERS):
        sim = feats @ centroids.t()  # [F, N]
        order = torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist()
        new = [-1] * ffn
        room = [m] * num_experts
        left = ffn
        for flat in order:
            j, c = divmod(flat, num_experts)
            if new[j] < 0 and room[c] > 0:
                new[j], room[c], left = c, room[c] - 1, left - 1
                if left == 0:
                    break
        new_t = torch.tensor(new)
        if assign is not None and torch.equal(new_t, assign):
            break
        assign = new_t
        centroids = _unit_rows(torch.stack([feats[assign == c].mean(0) for c in range(num_experts)]))
    groups = sorted((torch.nonzero(assign == c).flatten() for c in range(num_experts)), key=lambda g: int(g[0]))
    return torch.cat(groups)


def _router_init(num_experts: int, hidden: int, seed: int, layer: int):
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    bound = 1.0 / math.sqrt(hidden)
    weight = (torch.rand(num_experts, hidden, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    bias = (torch.rand(num_experts, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return weight, bias


def _fill(model, dense_params: Dict[str, torch.Tensor], fl: Dict) -> None:
    """Copy the dense weights into the factorised model (routers: their seeded init)."""
    n, split, seed = fl["num_experts"], fl["split"], fl["seed"]
    done = set()
    for name, param in model.named_parameters():
        if ".mlp." not in name:
            if name not in dense_params or dense_params[name].shape != param.shape:
                raise CheckpointError(f"the dense checkpoint has no tensor {name!r} of shape {tuple(param.shape)}")
            param.data.copy_(dense_params[name])
            done.add(name)
    for index, layer in enumerate(model.decoder.layers):  # one process, pp=1: local = global index
        local = f"decoder.layers.{index}.mlp."
        fc1, fc2 = dense_params[local + "linear_fc1.weight"], dense_params[local + "linear_fc2.weight"]
        gate, up = fc1.chunk(2, dim=0)
        perm = neuron_split(gate, up, fc2, n, split, seed + index)
        m = gate.shape[0] // n
        moe = layer.mlp
        for e, expert in enumerate(moe.experts.local_experts):
            rows = perm[e * m:(e + 1) * m]
            expert.linear_fc1.weight.data.copy_(torch.cat([gate[rows], up[rows]], dim=0))
            expert.linear_fc2.weight.data.copy_(fc2[:, rows])
        weight, bias = _router_init(n, gate.shape[1], seed, index)
        moe.router.weight.data.copy_(weight)
        moe.router.bias.data.copy_(bias)
        done.update(local + k for k in ("linear_fc1.weight", "linear_fc2.weight"))
    unused = sorted(set(dense_params) - done)
    if unused:
        raise CheckpointError(f"dense tensors with no place in the factorised model: {unused[:5]}")


def factorize(mcore_dir: str, out_dir: str, num_experts: int, top_k: int | None = None,
              split: str = "contiguous", seed: int = 1234, overwrite: bool = False) -> Dict:
    """Write the FactorLLM factorisation of the converted dense base ``mcore_dir`` to ``out_dir``.
    ``top_k`` defaults to N/2 (FactorLLM's default; 1 for N = 1)."""
    from megatron.core import dist_checkpointing

    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"output directory {os.path.abspath(out_dir)} already exists "
                              f"(pass --overwrite to replace it)")
    if not os.path.isdir(mcore_dir):
        raise FileNotFoundError(f"--mcore {mcore_dir}: no such checkpoint directory")
    spec = read_spec(mcore_dir)
    top_k = max(1, num_experts // 2) if top_k is None and isinstance(num_experts, int) else top_k
    new_spec = factorised_spec(spec, num_experts, top_k, split, seed)
    info = conversion_runtime()
    cpu = torch.device("cpu")
    dense = load_model(mcore_dir, device=cpu)
    dense_params = {k: v.detach() for k, v in dense.named_parameters()}
    model = build_model(new_spec, dtype_from_name(spec["params_dtype"]), cpu)
    with torch.no_grad():
        _fill(model, dense_params, new_spec["factorllm"])
    del dense, dense_params
    with shared_output_dir(out_dir, overwrite, info) as tmp:
        if info.rank == 0:
            os.makedirs(os.path.join(tmp, DIST_DIR))
        _barrier(info)
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, DIST_DIR))
        if info.rank == 0:
            _write_side_files(mcore_dir, tmp, new_spec["factorllm"])
            with open(os.path.join(tmp, SPEC_NAME), "w") as f:
                json.dump(new_spec, f, indent=2)
                f.write("\n")
    return new_spec


def save_model(chunks, base_dir: str, out_dir: str) -> None:
    """Collective (every rank): write a trained factorised model (its chunks at any layout) as a
    converted checkpoint beside its base's spec and Hugging Face files; atomic, replaces ``out_dir``."""
    from megatron.core import dist_checkpointing

    from megatron_mole import runtime

    info = runtime.get_runtime()
    spec = read_spec(base_dir)
    spec["params_dtype"] = dtype_name(next(chunks[0].parameters()).dtype)
    spec["factorllm"]["trained_from"] = os.path.abspath(base_dir)
    with shared_output_dir(out_dir, True, info) as tmp:
        if info.rank == 0:
            os.makedirs(os.path.join(tmp, DIST_DIR))
        _barrier(info)
        dist_checkpointing.save({f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)},
                                os.path.join(tmp, DIST_DIR))
        if info.rank == 0:
            src = os.path.join(base_dir, HF_DIR)
            if os.path.isdir(src):  # already the factorised config
                copy_side_files(src, os.path.join(tmp, HF_DIR))
            with open(os.path.join(tmp, SPEC_NAME), "w") as f:
                json.dump(spec, f, indent=2)
                f.write("\n")


def add_arguments(parser) -> None:
    parser.add_argument("--mcore", required=True, help="converted dense base (megatron-mole convert hf-to-mcore)")
    parser.add_argument("--out", required=True, help="output directory (a converted MoE checkpoint)")
    parser.add_argument("--experts", type=int, required=True, help="experts per MLP, N (must divide the FFN size)")
    parser.add_argument("--top-k", type=int, default=None, dest="top_k", help="experts per token, K (default N/2)")
    parser.add_argument("--split", choices=SPLITS, default="contiguous",
                        help="contiguous neuron ranges, or balanced clusters of similar neurons")
    parser.add_argument("--seed", type=int, default=1234, help="router init and cluster start")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    start = time.perf_counter()
    spec = factorize(args.mcore, args.out, args.experts, args.top_k, args.split, args.seed, args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        fl = spec["factorllm"]
        print(f"factorize: {spec['transformer']['num_layers']} MLPs of {fl['dense_ffn_hidden_size']} neurons -> "
              f"{fl['num_experts']} experts of {fl['dense_ffn_hidden_size'] // fl['num_experts']} "
              f"(top-{fl['top_k']}, {fl['split']}) -> {args.out} in {time.perf_counter() - start:.1f}s")
    return 0
