"""FactorLLM measured: dense vs factorised loss/perplexity before and after router training,
and forward time at K/N = 1/2 vs dense (README "FactorLLM").

    python tools/factorllm_bench.py --work-dir work_factorllm [--steps 60] [--experts 4]

One process, CPU (or the machine's first GPU): builds the quickstart's base (its data,
tokenizer and tiny Llama pretrained on the texts; ``--hidden``/``--ffn``/``--layers``
make it larger), converts it, factorises it (N experts, top N/2, contiguous and
clustered), and trains FactorLLM (``megatron-mole train`` machinery, ``method:
factorllm``) for ``--steps`` steps, routers only, experts + routers and LoRA adapters on the
frozen experts + routers (``--trainable``, ``--split`` pick a subset). Every model is
evaluated on the same held-out batches (another seed of the synthetic set, response
tokens only); the same training of the all-experts factorisation (= the dense MLPs
fine-tuned; ``--no-baseline`` skips it) is the baseline for experts + routers. Forward times are the median of ``--reps`` no-grad forwards of
[8, 128] tokens, dense and factorised timed alternately in this process.
"""
import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def _eval_batches(work: Path, tokenizer_dir: Path, batches: int, seq: int):
    from transformers import AutoTokenizer

    from megatron_mole.training.data import InstructionDataset
    from megatron_mole.training.sampler import GlobalBatchLoader
    from megatron_mole.training.synthetic import write_instruction_dataset

    path = write_instruction_dataset(work / "eval", 64, seed=4242)
    dataset = InstructionDataset.from_jsonl([str(path)], AutoTokenizer.from_pretrained(tokenizer_dir), seq)
    loader = GlobalBatchLoader(dataset, 8, seed=7, packing=False, dp_rank=0, dp_size=1)
    return [loader.next_global_batch() for _ in range(batches)]


def evaluate(mcore_dir: str, batches, device) -> float:
    """Mean loss over the response tokens of ``batches``."""
    from megatron_mole.checkpoint.mcore import load_model

    model = load_model(mcore_dir).eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in batches:
            losses = model(b["tokens"].to(device), b["position_ids"].to(device), None,
                           labels=b["labels"].clamp(min=0).to(device)).float()
            mask = b["loss_mask"].to(device).float()
            total += float((losses * mask).sum())
            count += float(mask.sum())
    return total / count


def forward_times(dirs: dict, reps: int, device, vocab: int) -> dict:
    """Median ms of a no-grad forward of [8, 128] tokens per model, models timed alternately."""
    from megatron_mole.checkpoint.mcore import load_model

    models = {name: load_model(d).eval() for name, d in dirs.items()}
    tokens = torch.randint(0, vocab, (8, 128), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(128, device=device)[None].expand(8, 128)
    times = {name: [] for name in models}
    with torch.no_grad():
        for rep in range(reps + 2):
            for name, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(tokens, pos, None)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep >= 2:  # warm-up
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(t) for name, t in times.items()}


def train(work: Path, base: str, out: str, trainable: str, steps: int) -> str:
    from megatron_mole.training.loop import Trainer
    from megatron_mole.training.train_config import config_from_dict

    cfg = config_from_dict({
        "base": {"checkpoint": base, "tokenizer": str(work / "hf_base")},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "micro_batch": 8, "global_batch": 16},
        "mole": {"method": "factorllm"},  # adapters: LoRA rank 8, alpha 16 (MoLEConfig's defaults)
        "factorllm": {"trainable": trainable},
        "optimizer": {"lr": 1.0e-3, "clip_grad": 1.0, "distributed": False},
        "schedule": {"max_steps": steps, "warmup_steps": min(10, steps), "decay_style": "cosine"},
        "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 64},
        "logging": {"progress": False, "log_jsonl": str(work / f"{Path(out).name}.jsonl")},
        "checkpoint": {"save_dir": out, "keep_last": 1},
    })
    Trainer(cfg).run()
    return str(Path(out) / f"model_step_{steps}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="work_factorllm")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--ffn", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="contiguous,clustered", help="comma-separated splits to train")
    parser.add_argument("--trainable", default="routers,experts+routers,adapters+routers",
                        help="comma-separated factorllm.trainable values to train")
    parser.add_argument("--no-baseline", action="store_true", help="skip the all-experts fine-tuning baseline")
    args = parser.parse_args(argv)
    splits, trainables = args.split.split(","), args.trainable.split(",")

    import megatron_mole as mm
    from megatron_mole import runtime
    from megatron_mole.checkpoint.factorize import factorize
    from megatron_mole.checkpoint.mcore import read_spec
    from megatron_mole.training.quickstart import build_base, convert

    work = Path(args.work_dir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    overrides = {k: v for k, v in {"hidden_size": args.hidden, "intermediate_size": args.ffn,
                                   "num_hidden_layers": args.layers}.items() if v is not None}
    # 120 pretraining steps: the setup its README table was measured with (the quickstart now pretrains 1000)
    convert(build_base(work, seed=args.seed, pretrain_steps=120, **overrides), work / "mcore")
    info = mm.init_distributed(tp=1, pp=1, ep=1)
    n, k = args.experts, max(1, args.experts // 2)
    dirs = {"dense": str(work / "mcore")}
    for split in splits:
        dirs[split] = str(work / f"fac_{split}")
        factorize(dirs["dense"], dirs[split], n, top_k=k, split=split, seed=args.seed)
    dirs["all_experts"] = str(work / "fac_all")
    factorize(dirs["dense"], dirs["all_experts"], n, top_k=n, seed=args.seed)
    batches = _eval_batches(work, work / "hf_base", args.eval_batches, 64)
    rows = [("dense", "dense base", evaluate(dirs["dense"], batches, info.device)),
            ("all_experts", f"factorised, all {n} experts (= dense)", evaluate(dirs["all_experts"], batches,
                                                                                  info.device))]
    for split in splits:
        rows.append((split, f"factorised {split}, top-{k}/{n}, before training",
                     evaluate(dirs[split], batches, info.device)))
        for trainable in trainables:
            start = time.perf_counter()
            trained = train(work, dirs[split], str(work / f"run_{split}_{trainable.replace('+', '_')}"), trainable,
                            args.steps)
            rows.append((trained, f"factorised {split}, top-{k}/{n}, after {args.steps} steps ({trainable}; "
                                  f"{time.perf_counter() - start:.0f}s)", evaluate(trained, batches, info.device)))
    # the same training with all N experts on (weight 1): the dense MLPs fine-tuned alike, a baseline
    if not args.no_baseline:
        start = time.perf_counter()
        trained = train(work, dirs["all_experts"], str(work / "run_all_experts"), "experts+routers", args.steps)
        rows.append((trained, f"dense MLPs fine-tuned alike (all {n} experts, experts+routers; "
                              f"{time.perf_counter() - start:.0f}s)", evaluate(trained, batches, info.device)))
    vocab = read_spec(dirs["dense"])["shapes"]["hf_vocab_size"]
    times = forward_times({"dense": dirs["dense"], "factorised": dirs[splits[0]]}, args.reps, info.device, vocab)
    print("| model | eval loss | perplexity |\n|---|---|---|")
    for _, what, loss in rows:
        print(f"| {what} | {loss:.4f} | {torch.tensor(loss).exp():.3f} |")
    ratio = times["factorised"] / times["dense"]
    print(f"\nforward [8 x 128 tokens], median of {args.reps}: dense {times['dense']:.2f} ms, factorised "
          f"top-{k}/{n} {times['factorised']:.2f} ms (x{ratio:.2f}) on {info.device.type}")
    (work / "results.json").write_text(json.dumps({"rows": rows, "times_ms": times}, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
