"""`megatron-mole quickstart --work-dir DIR [--max-steps N] [--save-interval N] [--base llama|mixtral]`: the whole product on a CPU.

Runs as one ordinary process (not under torchrun) and launches the distributed part
itself:

1. ``DIR/data/train.jsonl``: the synthetic four-domain instruction set (synthetic.py);
2. ``DIR/hf_base/``: a byte-level BPE tokenizer trained on that text (no hub) and a tiny
   Llama (``transformers.LlamaConfig``: hidden 64, 2 layers, GQA, SwiGLU), pretrained
   for a few seconds on the dataset's prompts and responses as unpaired documents (so
   it knows the words but not the tasks), saved as safetensors;
3. ``DIR/mcore/``: the base converted by ``megatron-mole convert hf-to-mcore``
   (a subprocess);
4. ``DIR/config.yaml`` and training: LLaVA-MoLE style adapters (one top-1 router per
   MLP, 4 LoRA experts on fc1/fc2, plain LoRA on attention) at EP=2 (each rank holds 2
   experts of every MLP; tokens reach them by all-to-all) trained by
   ``torchrun --nproc-per-node 2 -m megatron_mole train`` (``torch.distributed.run``
   in a subprocess, one thread per rank), logging to ``DIR/train.jsonl`` and saving to
   ``DIR/checkpoints/``. The ranks use GPUs when the machine has at least 2, else they run
   on CPU (the GPUs hidden from them; the output says which);
   With ``--base mixtral`` the base is a tiny Mixtral-style MoE (4 experts, top-2, the same
   sizes; Megatron shards its experts 2 per rank at EP=2) and the adapter PERFT-R (4 adapter
   experts with their own top-2 router beside every MoE block, sharded 2 per rank; LoRA on
   attention);
5. ``DIR/hf_adapter/``: the adapter exported for transformers, and a few generations
   of the base with the adapter loaded (when the export command and
   ``megatron_mole.hf.load_mole_adapter`` are installed; otherwise it says so).

Legend (pretraining): N tokens of the corpus, B rows, S sequence length.

Each run starts training afresh: a previous run's ``train.jsonl``, ``checkpoints/``
and ``hf_adapter/`` are replaced. Everything is a function of ``--seed``.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

NPROC = 2
# The quickstart's layout on its 2 processes: the 4 LoRA experts of each MLP sharded 2 per rank.
LAYOUT = {"tp": 1, "pp": 1, "ep": 2}
BASE = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}
EXAMPLES_PER_DOMAIN = 256
VOCAB_SIZE = 512
PRETRAIN_STEPS = 1000
HELDOUT_PER_DOMAIN = 25


# --base mixtral: a Mixtral-style MoE base (4 experts, top-2, renormalised gates) of the same sizes
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96, "router_aux_loss_coef": 0.0}
BASES = ("llama", "mixtral")


def build_base(work_dir: Path, seed: int = 0, examples_per_domain: int = EXAMPLES_PER_DOMAIN,
               pretrain_steps: int = PRETRAIN_STEPS, base: str = "llama", **base_overrides) -> Path:
    """Data, tokenizer and a tiny Llama or Mixtral (briefly pretrained) in ``work_dir/hf_base``;
    returns that directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    if base not in BASES:
        raise ValueError(f"quickstart: --base must be one of {BASES}, got {base!r}")
    config_cls, model_cls = (MixtralConfig, MixtralForCausalLM) if base == "mixtral" else (LlamaConfig,
                                                                                           LlamaForCausalLM)
    if base == "mixtral":
        base_overrides = dict(MIXTRAL, **base_overrides)

    from megatron_mole.training.synthetic import generate_records, record_texts, skill_texts, \
        write_instruction_dataset
    from megatron_mole.training.tokenizer import train_tokenizer

    write_instruction_dataset(work_dir, examples_per_domain, seed)
    hf_dir = work_dir / "hf_base"
    texts = record_texts(generate_records(examples_per_domain, seed))
    tokenizer = train_tokenizer(texts, hf_dir, vocab_size=VOCAB_SIZE)
    config = config_cls(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        **dict(BASE, **base_overrides))
    torch.manual_seed(seed)
    model = model_cls(config)
    if pretrain_steps:  # the words, and the skills stated as plain text (not the instructions)
        pretrain(model, tokenizer, texts + skill_texts(examples_per_domain, seed + 1), pretrain_steps, seed)
    model.save_pretrained(hf_dir)
    return hf_dir


def pretrain(model, tokenizer, texts, steps: int, seed: int, seq_length: int = 64, batch: int = 16):
    """Next-token training of every weight on ``texts`` as separate documents (the quickstart's:
    prompts and responses unpaired, and the rules stated as plain text, ``synthetic.skill_text``):
    the base learns the language and the skills, not the instructions, and gets a usable output layer. A random
    base's output layer (std 0.02 on a normalised hidden state) keeps every logit near zero, which no
    adapter on the blocks can undo."""
    import torch

    ids_N = torch.tensor([i for text in texts for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts_B = torch.randint(0, len(ids_N) - seq_length, (batch,), generator=generator)
        tokens_BS = torch.stack([ids_N[s:s + seq_length] for s in starts_B.tolist()])
        loss = model(input_ids=tokens_BS, labels=tokens_BS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"quickstart: pretrained the base {steps} steps on {len(texts)} texts (last loss {loss.item():.3f})", flush=True)


def train_config(work_dir: Path, max_steps: int, save_interval: int, seed: int = 0, base: str = "llama") -> dict:
    """The quickstart's training config (what ``DIR/config.yaml`` holds), paths absolute. ``base="mixtral"``:
    PERFT-R (4 adapter experts, top-2, its own router) on every MoE block, sharded over EP=2 like the
    base's own experts, and LoRA on attention."""
    work_dir = work_dir.resolve()
    mole = {"num_experts": 4, "rank": 8, "alpha": 16, "top_k": 1, "expert_scope": "mlp",
            "targets": ["linear_fc1", "linear_fc2", "linear_qkv", "linear_proj"],
            "aux_loss_coeff": 0.01, "dispatch": "alltoall", "seed": seed}
    if base == "mixtral":
        mole.update(method="perft-r", top_k=2)
    return {
        "base": {"checkpoint": str(work_dir / "mcore"), "tokenizer": str(work_dir / "hf_base")},
        "parallel": dict(LAYOUT, micro_batch=4, global_batch=16),
        "mole": mole,
        "optimizer": {"lr": 3.0e-3, "clip_grad": 1.0, "distributed": True},
        "schedule": {"max_steps": max_steps, "warmup_steps": min(10, max_steps), "decay_style": "cosine"},
        "data": {"paths": [str(work_dir / "data" / "train.jsonl")], "seq_length": 64, "packing": True},
        "logging": {"log_jsonl": str(work_dir / "train.jsonl"), "progress": True},
        "checkpoint": {"save_dir": str(work_dir / "checkpoints"), "interval": save_interval, "keep_last": 2},
        "seed": seed,
    }


def _run(command: list, what: str, env=None) -> float:
    print(f"quickstart: {what}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"quickstart: {what} failed (exit status {completed.returncode})")
    return time.perf_counter() - start


def _rank_env() -> dict:
    # 2 ranks on a small CPU box: one intra-op thread each, or they fight over the cores.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def rank_devices(nproc: int = NPROC) -> tuple:
    """(environment overrides, message) for the training ranks: GPUs when the machine has one per
    rank, else CPU ranks. ``device="auto"`` maps a rank to ``cuda:LOCAL_RANK``, so on a machine
    with fewer GPUs than ranks some rank would ask for a GPU that is not there; hiding the GPUs
    (``CUDA_VISIBLE_DEVICES=""``) makes every rank run on CPU (gloo) instead."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= nproc:
        return {}, f"quickstart: the {nproc} training ranks run on GPUs cuda:0..{nproc - 1} (nccl)"
    if visible == 0:
        return {}, f"quickstart: no GPU: the {nproc} training ranks run on CPU (gloo)"
    return {"CUDA_VISIBLE_DEVICES": ""}, (
        f"quickstart: {visible} GPU(s) visible, fewer than the {nproc} training ranks (expert parallel "
        f"{LAYOUT['ep']}): the ranks run on CPU (gloo)")


def convert(hf_dir: Path, out_dir: Path):
    """``megatron-mole convert hf-to-mcore`` in a subprocess (its CPU runtime stays out of this process)."""
    _run([sys.executable, "-m", "megatron_mole", "convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(out_dir),
          "--overwrite"], "convert", env=_rank_env())


def export_and_generate(work_dir: Path, num_prompts: int = 4) -> bool:
    """Export the last checkpoint to ``DIR/hf_adapter`` and print generations; False when unavailable."""
    if importlib.util.find_spec("megatron_mole.checkpoint.export_cli") is None:
        print("quickstart: skipping export and generation: `megatron-mole export` is not installed in this "
              "version (the trained adapter is in checkpoints/)", flush=True)
        return False
    out = work_dir / "hf_adapter"
    if out.exists():
        shutil.rmtree(out)
    _run([sys.executable, "-m", "megatron_mole", "export", "--checkpoint", str(work_dir / "checkpoints"),
          "--base", str(work_dir / "mcore"), "--out", str(out)], "export", env=_rank_env())
    try:
        from megatron_mole.hf import load_mole_adapter
    except ImportError:
        print("quickstart: skipping generation: megatron_mole.hf.load_mole_adapter is not available", flush=True)
        return False
    generate(work_dir / "hf_base", out, load_mole_adapter, num_prompts)
    return True


def generate(base_dir: Path, adapter_dir: Path, load_adapter, num_prompts: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mole.training.synthetic import demo_prompts

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    for domain, prompt, expected in demo_prompts()[:num_prompts]:
        print(f"  [{domain}] {prompt!r} -> {greedy_answer(model, tokenizer, prompt)!r} (expected {expected!r})", flush=True)


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 10) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def heldout_accuracy(base_dir: Path, prompts, adapter_dir: Path | None = None, load_adapter=None) -> dict:
    """{domain: exact-match accuracy} of greedy answers to ``prompts`` ([(domain, prompt, expected)])
    by the transformers base, with the exported adapter when ``adapter_dir`` is given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = load_adapter(model, str(adapter_dir))
    model.eval()
    hits, counts = {}, {}
    with torch.inference_mode():
        for domain, prompt, expected in prompts:
            counts[domain] = counts.get(domain, 0) + 1
            hits[domain] = hits.get(domain, 0) + (greedy_answer(model, tokenizer, prompt) == expected)
    return {d: hits[d] / counts[d] for d in counts}


def print_accuracy(before: dict, after: dict | None, per_domain: int):
    print(f"quickstart: exact-match accuracy on {per_domain} held-out prompts per domain (greedy):", flush=True)
    print(f"  {'domain':<12} {'base':>6} {'+adapter':>9}", flush=True)
    for domain in before:
        trained = "" if after is None else f"{after[domain]:>9.0%}"
        print(f"  {domain:<12} {before[domain]:>6.0%} {trained}", flush=True)


def add_arguments(parser):
    parser.add_argument("--work-dir", required=True, help="output directory (created)")
    parser.add_argument("--max-steps", type=int, default=150, help="training steps")
    parser.add_argument("--save-interval", type=int, default=50, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                        help="steps of pretraining the tiny base (all weights) before fine-tuning")
    parser.add_argument("--heldout", type=int, default=HELDOUT_PER_DOMAIN,
                        help="held-out prompts per domain for the accuracy before/after training (0: skip)")
    parser.add_argument("--base", choices=BASES + ("llava",), default="llama",
                        help="llama: MoLE on a tiny Llama (default); mixtral: PERFT-R on a tiny Mixtral-style "
                             "MoE base (4 experts, top-2); llava: a tiny vision-language base with MoLE + "
                             "Parrot (training/llava_quickstart.py)")


def run(args) -> int:
    if getattr(args, "base", "llama") == "llava":
        from megatron_mole.training.llava_quickstart import run as run_llava

        return run_llava(args)
    import yaml

    if args.max_steps < 1 or args.save_interval < 0:
        raise SystemExit(f"quickstart: --max-steps must be >= 1 and --save-interval >= 0, got "
                         f"{args.max_steps} and {args.save_interval}")
    if args.heldout < 0:
        raise SystemExit(f"quickstart: --heldout must be >= 0, got {args.heldout}")
    import torch

    # One thread: two training ranks share the machine with this process, and oversubscribed
    # intra-op threads on a loaded 2-core box made the base's pretraining 40x slower.
    torch.set_num_threads(1)
    start = time.perf_counter()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("train.jsonl", "checkpoints", "hf_adapter"):
        path = work_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    base = getattr(args, "base", "llama")
    hf_dir = build_base(work_dir, args.seed, pretrain_steps=args.pretrain_steps, base=base)
    what = "Mixtral-style MoE (4 experts, top-2)" if base == "mixtral" else "Llama"
    print(f"quickstart: wrote {work_dir / 'data' / 'train.jsonl'} and a tiny {what} base in {hf_dir} "
          f"({time.perf_counter() - start:.1f}s)", flush=True)
    if args.heldout:
        from megatron_mole.training.synthetic import generate_records, heldout_prompts

        prompts = heldout_prompts(args.heldout, generate_records(EXAMPLES_PER_DOMAIN, args.seed))
        before = heldout_accuracy(hf_dir, prompts)
    convert(hf_dir, work_dir / "mcore")

    config_path = work_dir / "config.yaml"
    with open(config_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(train_config(work_dir, args.max_steps, args.save_interval, args.seed, base), handle,
                       sort_keys=False)
    device_env, device_message = rank_devices(NPROC)
    print(device_message, flush=True)
    seconds = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
                    "-m", "megatron_mole", "train", "--config", str(config_path)], f"train on {NPROC} processes",
                   env=dict(_rank_env(), **device_env))
    print(f"quickstart: training took {seconds:.1f}s; log {work_dir / 'train.jsonl'}, "
          f"checkpoints {work_dir / 'checkpoints'}", flush=True)
    after = None
    if export_and_generate(work_dir) and args.heldout:
        from megatron_mole.hf import load_mole_adapter

        after = heldout_accuracy(hf_dir, prompts, work_dir / "hf_adapter", load_mole_adapter)
    if args.heldout:
        print_accuracy(before, after, args.heldout)
    print(f"quickstart: done in {time.perf_counter() - start:.1f}s", flush=True)
    return 0
