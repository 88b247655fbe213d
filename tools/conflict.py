"""The data-conflict experiment: one LoRA vs MoLE top-1 vs DynMoLE on domains whose rules conflict.

    PYTHONPATH=. python tools/conflict.py --work /tmp/conflict [--seeds 0 1 2] [--steps 150] \\
        [--out examples/conflict]

One process, no torchrun (it sets a one-rank environment itself):

1. **Data**: four instruction domains with the *same prompt form* ``Rewrite (TAG): w1 w2``
   over one word list, asking for conflicting behaviour: ``reverse`` (the words reversed),
   ``capitalize`` (each word capitalised), ``translate`` (a fixed word map) and ``copy`` (the
   words unchanged). Only the tag (a neutral word: ``one``..``four``) tells them apart, so the
   same input words need four different outputs.
2. **Base**: a byte-level BPE tokenizer and a tiny Llama (hidden 64, 2 layers, as the
   quickstart's) briefly pretrained on a mixture: the fine-tuning prompts and responses as
   unpaired texts, and raw-text demonstrations of the four skills with their own cue words
   (``red cat backwards is cat red``, ``red cat in capitals is Red Cat``, ...). The base thus has
   the skills; fine-tuning must learn which neutral tag asks for which, in the chat format.
3. **Fine-tuning**, for every seed, on the same data, steps, batch and learning rate, adapters on
   every MLP's fc1 and fc2 only (attention frozen), at equal trainable parameters:
   ``lora`` (one LoRA, rank 16), ``mole`` (4 LoRA experts of rank 4, top-1 router,
   LLaVA-MoLE) and ``dynmole`` (the same experts, DynMoLE's Tsallis/top-p router, its
   defaults; it may use several experts per token, so it costs more compute per token).
4. **Evaluation** on held-out prompts (not in the training data): per domain, the mean loss of the
   response tokens (teacher-forced) and exact-match accuracy of greedy answers, with the trained
   adapter exported and run by transformers (``megatron_mole.hf``); mean and standard deviation
   over the seeds.
5. ``megatron-mole analyze`` on seed 0's MoLE and DynMoLE adapters: which experts each domain uses.

Writes ``WORK/results.json`` and, with ``--out``, ``results.md`` (the table) and the analyze heat
maps (``mole_expert_load.png``, ``dynmole_expert_load.png``) there.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("red", "blue", "green", "cat", "dog", "bird", "fish", "tree", "house", "river", "sun", "moon",
         "runs", "sees", "eats", "jumps", "big", "small", "old", "new")
ZORBISH = ("vok", "dru", "nel", "zim", "pax", "tiro", "gume", "sol", "kerb", "lumo", "ash", "ny",
           "prel", "vash", "oom", "kip", "bara", "tet", "yul", "fen")
TAGS = {"reverse": "one", "capitalize": "two", "translate": "three", "copy": "four"}
DOMAINS = tuple(TAGS)
BASE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
# Equal trainable parameters (fc1/fc2 LoRA only): 4 experts x rank 4 = one LoRA of rank 16 (+ the routers).
METHODS = {
    "lora": {"num_experts": 1, "rank": 16, "alpha": 32, "top_k": 1},
    "mole": {"num_experts": 4, "rank": 4, "alpha": 8, "top_k": 1},
    "dynmole": {"num_experts": 4, "rank": 4, "alpha": 8, "top_k": 1, "router": "dynmole"},
}


def make_example(domain: str, rng: random.Random) -> tuple:
    words = [rng.choice(WORDS) for _ in range(2)]  # 400 prompts a domain: 300 train, 40 held out
    prompt = f"Rewrite ({TAGS[domain]}): {' '.join(words)}"
    if domain == "reverse":
        return prompt, " ".join(reversed(words))
    if domain == "capitalize":
        return prompt, " ".join(w.capitalize() for w in words)
    if domain == "translate":
        return prompt, " ".join(dict(zip(WORDS, ZORBISH))[w] for w in words)
    return prompt, " ".join(words)


# How the pretraining text states each skill (no tag): the base learns the four behaviours, not
# which neutral tag asks for which.
SKILL_CUES = {"reverse": "backwards is", "capitalize": "in capitals is", "translate": "in Zorbish is",
              "copy": "repeated is"}


def skill_texts(per_domain: int, seed: int = 2) -> list:
    """Raw-text demonstrations of the skills (``red cat backwards is cat red``) for pretraining."""
    rng = random.Random(seed)
    out = []
    for domain in DOMAINS:
        for _ in range(per_domain):
            prompt, response = make_example(domain, rng)
            out.append(f"{prompt.split(': ', 1)[1]} {SKILL_CUES[domain]} {response}")
    return out


def records(per_domain: int, seed: int, exclude=frozenset()) -> list:
    """Distinct prompts per domain (none in ``exclude``), shuffled."""
    rng = random.Random(seed)
    out = []
    for domain in DOMAINS:
        seen = set()
        while len(seen) < per_domain:
            prompt, response = make_example(domain, rng)
            if prompt not in seen and prompt not in exclude:
                seen.add(prompt)
                out.append({"domain": domain, "prompt": prompt, "response": response})
    rng.shuffle(out)
    return out


def build_base(work: Path, per_domain: int, pretrain_steps: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_mole.training.quickstart import convert, pretrain
    from megatron_mole.training.tokenizer import train_tokenizer

    train = records(per_domain, seed=0)
    heldout = records(40, seed=1, exclude=frozenset(r["prompt"] for r in train))
    (work / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        with open(work / "data" / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    texts = [t for r in train for t in (r["prompt"], r["response"])] + skill_texts(per_domain)
    tokenizer = train_tokenizer(texts, work / "hf_base", vocab_size=512)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **BASE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    pretrain(model, tokenizer, texts, pretrain_steps, seed=0)
    model.save_pretrained(work / "hf_base")
    convert(work / "hf_base", work / "mcore")
    return heldout


def train_config(work: Path, method: str, seed: int, steps: int) -> dict:
    mole = dict(METHODS[method], targets=["linear_fc1", "linear_fc2"], expert_scope="mlp", seed=seed,
                aux_loss_coeff=0.01 if method == "mole" else 0.001 if method == "dynmole" else 0.0)
    run = work / "runs" / f"{method}_{seed}"
    return {"base": {"checkpoint": str(work / "mcore"), "tokenizer": str(work / "hf_base")},
            "parallel": {"micro_batch": 16, "global_batch": 16}, "mole": mole,
            "optimizer": {"lr": 3.0e-3, "clip_grad": 1.0, "distributed": False},
            "schedule": {"max_steps": steps, "warmup_steps": min(10, steps), "decay_style": "cosine"},
            "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 64, "packing": True},
            "logging": {"log_jsonl": str(run / "train.jsonl"), "progress": False},
            "checkpoint": {"save_dir": str(run / "checkpoints"), "keep_last": 1}, "seed": seed}


def evaluate(work: Path, adapter_dir: Path, heldout: list) -> dict:
    """{domain: {"loss", "accuracy"}} of the base with the exported adapter on the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mole.hf import load_mole_adapter
    from megatron_mole.training.data import tokenize_messages
    from megatron_mole.training.quickstart import greedy_answer

    tokenizer = AutoTokenizer.from_pretrained(work / "hf_base")
    model = load_mole_adapter(AutoModelForCausalLM.from_pretrained(work / "hf_base"), str(adapter_dir)).eval()
    sums = {d: [0.0, 0, 0, 0] for d in DOMAINS}  # loss sum, tokens, hits, prompts
    with torch.inference_mode():
        for r in heldout:
            ids_L, supervised_L = tokenize_messages(tokenizer, [{"role": "user", "content": r["prompt"]},
                                                                {"role": "assistant", "content": r["response"]}])
            ids = torch.as_tensor(ids_L).view(1, -1)
            logits = model(input_ids=ids).logits[0, :-1].float()
            mask = torch.as_tensor(supervised_L[1:]).bool()
            loss = torch.nn.functional.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum")
            s = sums[r["domain"]]
            s[0] += float(loss)
            s[1] += int(mask.sum())
            s[2] += greedy_answer(model, tokenizer, r["prompt"]) == r["response"]
            s[3] += 1
    return {d: {"loss": s[0] / s[1], "accuracy": s[2] / s[3]} for d, s in sums.items()}


def run_all(args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    from megatron_mole.checkpoint.export_cli import export
    from megatron_mole.training.analyze import analyze
    from megatron_mole.training.loop import train
    from megatron_mole.training.train_config import config_from_dict

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    start = time.perf_counter()
    heldout = build_base(work, args.per_domain, args.pretrain_steps)
    print(f"conflict: base built in {time.perf_counter() - start:.0f}s", flush=True)
    results = {}
    for seed in args.seeds:
        for method in METHODS:
            t0 = time.perf_counter()
            cfg = config_from_dict(train_config(work, method, seed, args.steps))
            result = train(cfg)
            run = work / "runs" / f"{method}_{seed}"
            export(Namespace(checkpoint=str(run / "checkpoints"), step=None, base=None, out=str(run / "hf_adapter"),
                             overwrite=True, format="mole", merge=False, hf_base=None))
            scores = evaluate(work, run / "hf_adapter", heldout)
            results.setdefault(method, {})[seed] = {"params": result.adapter_params, "domains": scores,
                                                    "train_loss": result.records[-1]["loss"],
                                                    "seconds": time.perf_counter() - t0}
            print(f"conflict: {method} seed {seed}: params {result.adapter_params}, "
                  + ", ".join(f"{d} {v['accuracy']:.0%}/{v['loss']:.2f}" for d, v in scores.items())
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    for method in ("mole", "dynmole"):
        run = work / "runs" / f"{method}_{args.seeds[0]}"
        analyze(Namespace(checkpoint=str(run / "checkpoints"), data=[str(work / "data" / "heldout.jsonl")],
                          out=str(run / "analyze"), base=None, tokenizer=None, step=None, tp=1, pp=1, ep=1,
                          max_examples=40, seq_length=64, micro_batch=16, select=None))
    summary = {"seeds": args.seeds, "steps": args.steps, "seconds": time.perf_counter() - start, "runs": results}
    (work / "results.json").write_text(json.dumps(summary, indent=1))
    table = markdown(results)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        for method in ("mole", "dynmole"):
            shutil.copy(work / "runs" / f"{method}_{args.seeds[0]}" / "analyze" / "expert_load.png",
                        out / f"{method}_expert_load.png")
    print(f"conflict: done in {time.perf_counter() - start:.0f}s", flush=True)


def _mean_std(values) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def markdown(results: dict) -> str:
    """Per method and domain: held-out accuracy and loss, mean ± std over seeds."""
    lines = ["| method | trainable params | " + " | ".join(DOMAINS) + " | mean |",
             "|---|---|" + "---|" * (len(DOMAINS) + 1)]
    for what, key, fmt in (("accuracy", "accuracy", "{:.0%} ± {:.0%}"), ("loss", "loss", "{:.3f} ± {:.3f}")):
        for method, by_seed in results.items():
            runs = list(by_seed.values())
            cells = [fmt.format(*_mean_std([r["domains"][d][key] for r in runs])) for d in DOMAINS]
            means = [statistics.fmean(r["domains"][d][key] for d in DOMAINS) for r in runs]
            cells.append(fmt.format(*_mean_std(means)))
            lines.append(f"| {method} ({what}) | {runs[0]['params']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work directory (replaced)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    parser.add_argument("--per-domain", type=int, default=300, help="training examples per domain (<= 360)")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--port", type=int, default=29641)
    parser.add_argument("--out", default=None, help="where to copy the table and plots (e.g. examples/conflict)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    run_all(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
