"""``megatron-mole bench model``: step time and peak memory of a whole model, per adapter method.

A Megatron GPTModel (local layer spec, RMSNorm, SwiGLU, GQA; ``--layers`` layers of
hidden ``--hidden``) trains one micro-batch of ``--seq`` tokens per step, fwd+bwd, with:
``base`` (frozen, no adapter: the backward still runs through the layers), ``lora`` (one
LoRA of rank r on qkv, proj, fc1, fc2), ``mole-top1`` / ``mole-top2`` (scope "mlp", E
experts on fc1/fc2, LoRA on attention). The base is dense, so PERFT (MoE bases) is not measured.
Each (variant, attention, recompute) runs in its own spawned process, so its peak memory
is its own: the rise of the process's peak RSS (CPU) or ``max_memory_allocated`` (GPU)
over the size resident before the first step (model and adapters built), during the steps. Printed: median step time,
tokens/s, the ratio to ``lora`` with the same attention and recompute, and peak memory.
Processes run one after another: on a shared machine, repeat and compare medians.

``--interleave`` measures step-time *ratios* instead: one process builds every variant's model
(same seed, same attention and recompute) and runs rounds of one step per variant, in turn; the
ratio to ``lora`` is taken within each round and its median printed, so load that drifts over
seconds affects all variants alike (separate processes minutes apart saw 0.2x-2.5x for the same
pair on a shared machine). Peak memory is not reported in that mode (the models share a process).
"""
import multiprocessing as mp
import statistics
import time


def add_arguments(parser):
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, nargs="+", default=[2048])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    # The base is dense: a PERFT method would fall back to MoLE on its dense MLPs (PERFT's rule for
    # the dense layers of a mixed base), so PERFT variants are not measured here.
    parser.add_argument("--variants", nargs="+", default=["base", "lora", "mole-top1", "mole-top2"])
    parser.add_argument("--attention", nargs="+", default=["local", "sdpa"])
    parser.add_argument("--recompute", nargs="+", default=["none", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--interleave", action="store_true",
                        help="step-time ratios from interleaved steps of every variant in one process")
    parser.add_argument("--rounds", type=int, default=7, help="--interleave: rounds of one step per variant")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        import os

        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _register_plain_lora():
    """A method putting one plain LoRA on every target (the baseline), for this benchmark."""
    from megatron_mole.layers.specs import METHODS, Method, register_method

    if "bench-lora" not in METHODS:
        @register_method
        class PlainLoRA(Method):
            name = "bench-lora"

            def kind_for(self, cfg, linear, in_dense_mlp):
                return "lora"


def _mole_config(variant, args):
    import megatron_mole as mm

    attention = ["linear_qkv", "linear_proj"]
    if variant == "lora":
        _register_plain_lora()
        return mm.MoLEConfig(method="bench-lora", num_experts=1, rank=args.rank,
                             targets=attention + ["linear_fc1", "linear_fc2"])
    if variant.startswith("mole-top"):
        return mm.MoLEConfig(num_experts=args.experts, rank=args.rank, top_k=int(variant[-1]), expert_scope="mlp",
                             targets=attention + ["linear_fc1", "linear_fc2"], lora_b_init="random")
    return mm.MoLEConfig(method=variant, num_experts=args.experts, rank=args.rank, top_k=2)


def _build(variant, attention, recompute, seq, args, info):
    """The variant's model and its training step (fwd+bwd of one micro-batch, grads dropped)."""
    import torch

    import megatron_mole as mm
    from tools.smoke import build_gpt

    torch.manual_seed(0)
    overrides = {} if recompute == "none" else dict(
        recompute_granularity=recompute, **({} if recompute == "selective" else
                                             dict(recompute_method="uniform", recompute_num_layers=1)))
    model, _ = build_gpt(vocab=args.vocab, seq=seq, num_layers=args.layers, attention=attention,
                         hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                         num_query_groups=args.groups, **overrides)
    model.to(info.device)
    if variant == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        model.embedding.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    else:
        mm.apply_mole(model, _mole_config(variant, args))
    tokens = torch.randint(0, args.vocab, (1, seq + 1), device=info.device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(seq, device=info.device)[None]
    cuda = info.device.type == "cuda"

    def step():
        model(inputs, position_ids, None, labels=labels).float().mean().backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return model, step


def _child(variant, attention, recompute, seq, args, queue):
    import torch

    try:
        torch.set_num_threads(args.threads)
        import megatron_mole as mm

        info = mm.init_distributed(device=args.device)
        _, step = _build(variant, attention, recompute, seq, args, info)
        cuda = info.device.type == "cuda"
        resident = torch.cuda.memory_allocated() if cuda else _rss_bytes()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()  # warm-up (counted in the peak: the same step)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()) - resident
        queue.put((statistics.median(times), max(peak, 0), None))
    except Exception as error:  # reported as a row, e.g. a method that is not registered
        queue.put((None, None, f"{type(error).__name__}: {error}"))


def _measure(variant, attention, recompute, seq, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(variant, attention, recompute, seq, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _child_interleaved(variants, attention, recompute, seq, args, queue):
    import torch

    try:
        torch.set_num_threads(args.threads)
        import megatron_mole as mm

        info = mm.init_distributed(device=args.device)
        steps, skipped = {}, {}
        for variant in variants:
            try:
                steps[variant] = _build(variant, attention, recompute, seq, args, info)[1]
                steps[variant]()  # warm-up
            except Exception as error:  # e.g. a method that is not registered
                skipped[variant] = f"{type(error).__name__}: {error}"
        rounds = []
        for _ in range(args.rounds):
            times = {}
            for variant, step in steps.items():
                start = time.perf_counter()
                step()
                times[variant] = time.perf_counter() - start
            rounds.append(times)
        queue.put((rounds, skipped, None))
    except Exception as error:
        queue.put((None, None, f"{type(error).__name__}: {error}"))


def _run_interleaved(args):
    for seq in args.seq:
        for attention in args.attention:
            for recompute in args.recompute:
                ctx = mp.get_context("spawn")
                queue = ctx.Queue()
                proc = ctx.Process(target=_child_interleaved,
                                   args=(args.variants, attention, recompute, seq, args, queue))
                proc.start()
                rounds, skipped, error = queue.get()
                proc.join()
                print(f"\nseq {seq}, attention {attention}, recompute {recompute} "
                      f"({args.rounds} interleaved rounds):")
                if error:
                    print(f"  failed: {error}")
                    continue
                for variant in rounds[0]:
                    seconds = statistics.median(r[variant] for r in rounds)
                    ratio = (f"{statistics.median(r[variant] / r['lora'] for r in rounds):5.2f}x"
                             if "lora" in rounds[0] else "  -  ")
                    print(f"  {variant:10s} {seconds * 1e3:8.0f} ms  {seq / seconds:8.0f} tok/s  {ratio} lora "
                          f"(median of per-round ratios)")
                for variant, why in skipped.items():
                    print(f"  {variant:10s} skipped ({why[:90]})")
    return 0


def run(args):
    if args.interleave:
        print(f"GPT {args.layers} layers H={args.hidden} F={args.ffn} heads={args.heads}/{args.groups} "
              f"vocab={args.vocab}, E={args.experts} r={args.rank}, one micro-batch fwd+bwd, "
              f"{args.threads} threads; step-time ratios from interleaved steps in one process")
        return _run_interleaved(args)
    print(f"GPT {args.layers} layers H={args.hidden} F={args.ffn} heads={args.heads}/{args.groups} "
          f"vocab={args.vocab}, E={args.experts} r={args.rank}, one micro-batch fwd+bwd, median of "
          f"{args.steps} steps, {args.threads} threads; peak = rise over the model's resident memory")
    for seq in args.seq:
        for attention in args.attention:
            for recompute in args.recompute:
                print(f"\nseq {seq}, attention {attention}, recompute {recompute}:")
                rows = {v: _measure(v, attention, recompute, seq, args) for v in args.variants}
                lora = rows.get("lora", (None,))[0]
                for variant, (seconds, peak, error) in rows.items():
                    if error:
                        print(f"  {variant:10s} skipped ({error[:90]})")
                        continue
                    ratio = f"{seconds / lora:5.2f}x" if lora else "  -  "
                    print(f"  {variant:10s} {seconds * 1e3:8.0f} ms  {seq / seconds:8.0f} tok/s  {ratio} lora  "
                          f"peak {peak / 2**20:7.0f} MiB")
    return 0


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="megatron-mole bench model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
