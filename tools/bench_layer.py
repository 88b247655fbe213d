"""``megatron-mole bench layer``: fwd+bwd cost of an adapted Megatron MLP.

Megatron's own MLP (local spec: ColumnParallelLinear fc1 with fused SwiGLU,
RowParallelLinear fc2) at hidden H, ffn F on T tokens, frozen, with:
``base`` (no adapter; the input still needs its gradient), ``lora`` (one LoRA
of rank r on fc1 and fc2), ``mole-top1``/``mole-top2`` (expert_scope "mlp",
E experts), ``mole-linear-top1/2`` (expert_scope "linear") and ``naive-top1/2``
(a MixLoRA-style loop: a boolean mask per expert over all tokens, the whole
MLP recomputed per chosen expert), and the seed routers in scope "mlp" at
top-2: ``router-dynmole``, ``router-gw``, ``router-mor`` (their mean experts per
token, which sets their cost, is printed beside them: an untrained dynmole
router is near uniform, so most tokens go dense). Variants run alternately in one process
(round-robin, so machine noise hits all of them alike); medians and the ratio
to ``lora`` of the same rank are printed, for wall time and for this
process's CPU time (more robust when other jobs share the cores; with several
threads it includes their spin-waits).

Legend: T tokens, H hidden, F ffn, E experts, K top-k.
"""
import statistics
import time

import torch
import torch.nn.functional as F


def add_arguments(parser):
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="subset of: base lora mole-top1 mole-top2 mole-linear-top1 "
                             "mole-linear-top2 naive-top1 naive-top2 router-dynmole router-gw router-mor")
    parser.add_argument("--backend", default="auto", help="grouped-matmul backend (MoLEConfig.grouped_mm_backend)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)


def _naive_forward(mlp, cfg, x_TH, router, experts1, experts2):
    """MixLoRA-style reference cost: per-expert masks over all tokens, the whole
    MLP (frozen fc1/fc2 included) run for each expert's tokens."""
    probs = torch.softmax(F.linear(x_TH.float(), router), -1)
    gates, idx = probs.topk(cfg.top_k, -1)
    g_hat = gates / gates.sum(-1, keepdim=True)
    out = torch.zeros_like(x_TH)
    w1, w2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
    for e in range(cfg.num_experts):
        hit = idx == e
        rows = hit.any(-1)
        xe = x_TH[rows]
        p = (gates * hit).sum(-1)[rows, None].to(x_TH.dtype) * cfg.scaling
        g = (g_hat * hit).sum(-1)[rows, None].to(x_TH.dtype)
        z = F.linear(xe, w1) + p * F.linear(F.linear(xe, experts1[0][e]), experts1[1][e])
        gate, up = z.chunk(2, -1)
        h = F.silu(gate) * up
        y = g * F.linear(h, w2) + p * F.linear(F.linear(h, experts2[0][e]), experts2[1][e])
        out = out.index_add(0, rows.nonzero().squeeze(-1), y)
    return out


def _variants(args, rank, device):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.mlp import MLP

    from megatron_mole.config import MoLEConfig
    from megatron_mole.runtime import compat
    from megatron_mole.layers.linear import LoRALinear, MoLELinear
    from megatron_mole.layers.mole_mlp import MoLEMLP

    tcfg = TransformerConfig(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                             num_attention_heads=8, gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=False, use_cpu_initialization=True,
                             params_dtype=torch.float32)
    spec = compat.local_mlp_submodules()

    def mlp():
        m = MLP(tcfg, spec, ffn_hidden_size=args.ffn).to(device)
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def mole_cfg(k, scope, router="topk"):
        return MoLEConfig(num_experts=args.experts, rank=rank, top_k=k, expert_scope=scope, router=router,
                          lora_b_init="random", aux_loss_coeff=0.01,
                          grouped_mm_backend=args.backend)

    def init(*wrappers):
        for w in wrappers:
            w.init_adapters(seed=1)
            w.to(device)
        return wrappers

    out = {"base": mlp()}
    m = mlp()
    cfg = mole_cfg(1, "mlp")
    m.linear_fc1, m.linear_fc2 = init(LoRALinear(m.linear_fc1, cfg), LoRALinear(m.linear_fc2, cfg))
    out["lora"] = m
    for k in (1, 2):
        out[f"mole-top{k}"] = init(MoLEMLP(mlp(), mole_cfg(k, "mlp")))[0]
        m, cfg = mlp(), mole_cfg(k, "linear")
        m.linear_fc1, m.linear_fc2 = init(MoLELinear(m.linear_fc1, cfg), MoLELinear(m.linear_fc2, cfg))
        out[f"mole-linear-top{k}"] = m
        ref = init(MoLEMLP(mlp(), mole_cfg(k, "mlp")))[0]
        params = [ref.router.weight, (ref.fc1.lora_a, ref.fc1.lora_b), (ref.fc2.lora_a, ref.fc2.lora_b)]
        out[f"naive-top{k}"] = (ref.base, ref.cfg, params)
    for router in ("dynmole", "gw", "mor"):
        out[f"router-{router}"] = init(MoLEMLP(mlp(), mole_cfg(2, "mlp", router)))[0]
    return out


def _step(variant, x):
    x = x.detach().requires_grad_()
    if isinstance(variant, tuple):
        mlp, cfg, (router, e1, e2) = variant
        y = _naive_forward(mlp, cfg, x.view(-1, x.shape[-1]), router, e1, e2)
    else:
        y = variant(x)[0]
    y.backward(torch.ones_like(y))


def run(args):
    import megatron_mole as mm

    if args.threads:
        torch.set_num_threads(args.threads)
    info = mm.init_distributed(device=args.device)
    device = info.device
    from megatron_mole.routing import AUX_LOSS_TRACKER

    names = args.variants or ["base", "lora", "mole-top1", "mole-top2", "mole-linear-top1",
                              "mole-linear-top2", "naive-top1", "naive-top2", "router-dynmole",
                              "router-gw", "router-mor"]
    x = torch.randn(args.tokens, 1, args.hidden, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"megatron MLP H={args.hidden} F={args.ffn} tokens={args.tokens} experts={args.experts} "
          f"fwd+bwd fp32 on {device} ({torch.get_num_threads()} threads), median of {args.rounds}")
    for rank in args.ranks:
        variants = _variants(args, rank, device)
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        experts_per_token = {}
        for n in names:  # warm-up
            AUX_LOSS_TRACKER.reset()
            _step(variants[n], x)
            stats = [v.get("experts_per_token") for v in AUX_LOSS_TRACKER.report().values()]
            if n.startswith("router-") and stats:
                experts_per_token[n] = stats[0]
        for _ in range(args.rounds):
            for n in names:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                _step(variants[n], x)
                sync()
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
        print(f"\nrank {rank}:            wall               cpu")
        for n in names:
            cells = []
            for times in (wall, cpu):
                med = statistics.median(times[n])
                ref = statistics.median(times["lora"]) if "lora" in times else None
                cells.append(f"{med * 1000:8.1f} ms" + (f" {med / ref:5.2f}x" if ref else ""))
            used = f"   {experts_per_token[n]:.2f} experts/token" if n in experts_per_token else ""
            print(f"  {n:18s} {cells[0]}   {cells[1]}{used}")
    return 0
