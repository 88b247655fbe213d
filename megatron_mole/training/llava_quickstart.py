"""`megatron-mole quickstart --base llava --work-dir DIR`: LLaVA-MoLE + Parrot end to end on a CPU.

1. ``DIR/data/``: synthetic images (a circle, square or triangle in one of four colours, at
   a random place and size, on a grey background) with questions and one-word answers in
   English, German, French and Spanish ("What colour is the shape?" / "Welche Form ...?"),
   as image instruction JSONL (``train.jsonl``, held-out ``eval.jsonl``);
2. ``DIR/hf_base/``: a byte-level BPE tokenizer with an ``<image>`` token, a CLIP image
   processor, and a tiny ``LlavaForConditionalGeneration`` (CLIP ViT hidden 32, 2 used
   layers; Llama hidden 64, 2 layers) pretrained briefly, in transformers, on the ENGLISH
   questions only: it answers in English and guesses in the other languages;
3. ``DIR/mcore/``: the base converted to Megatron-core (``megatron-mole convert``);
4. ``DIR/config.yaml`` and ``megatron-mole train`` on 2 processes (``torch.distributed.run``,
   data parallel; the same loop as a GPT base, training/llava_family.py): Megatron's LLaVAModel
   with MoLE on the LM (4 LoRA experts per MLP, top-1) and Parrot between the projector
   and the LM (4 SwiGLU experts); Parrot's stage 1 (projector only) then stage 2 (Parrot,
   projector and the LM's adapters), on all four languages; ``DIR/checkpoints/``;
5. ``DIR/hf_adapter/``: ``megatron-mole export`` of the last checkpoint (adapters, projector,
   Parrot); transformers answers the held-out questions with the base and with the adapter,
   and the per-language accuracy of both is printed.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("circle", "square", "triangle")
LANGUAGES = {
    "en": ("What colour is the shape?", "What shape is it?",
           {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow",
            "circle": "circle", "square": "square", "triangle": "triangle"}),
    "de": ("Welche Farbe hat die Form?", "Welche Form ist es?",
           {"red": "rot", "green": "gruen", "blue": "blau", "yellow": "gelb",
            "circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck"}),
    "fr": ("De quelle couleur est la forme ?", "Quelle forme est-ce ?",
           {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune",
            "circle": "cercle", "square": "carre", "triangle": "triangle"}),
    "es": ("De que color es la forma?", "Que forma es?",
           {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
            "circle": "circulo", "square": "cuadrado", "triangle": "triangulo"}),
}
IMAGE = 32
PATCH = 8
NPROC = 2


def draw(colour: str, shape: str, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE, IMAGE), (128, 128, 128))
    size = rng.randint(14, 24)
    x, y = rng.randint(1, IMAGE - size - 1), rng.randint(1, IMAGE - size - 1)
    pen, box = ImageDraw.Draw(image), (x, y, x + size, y + size)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
    return image


def write_data(data_dir: Path, per_combo: int, seed: int, name: str) -> list:
    """Images and records (all four languages, both questions per image); returns the records."""
    rng = random.Random(f"{seed}-{name}")
    (data_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for colour in COLOURS:
        for shape in SHAPES:
            for k in range(per_combo):
                image = f"images/{name}-{colour}-{shape}-{k}.png"
                draw(colour, shape, rng).save(data_dir / image)
                for lang, (q_colour, q_shape, words) in LANGUAGES.items():
                    for question, answer in ((q_colour, words[colour]), (q_shape, words[shape])):
                        records.append({"domain": lang, "image": image, "messages": [
                            {"role": "user", "content": f"<image>\n{question}"},
                            {"role": "assistant", "content": answer}]})
    rng.shuffle(records)
    with open(data_dir / f"{name}.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def build_base(work_dir: Path, seed: int, pretrain_steps: int, per_combo: int = 8) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, \
        LlavaForConditionalGeneration

    from megatron_mole.training.mm_data import MultimodalDataset, collate, read_image_jsonl
    from megatron_mole.training.tokenizer import ROLE_TOKENS, train_tokenizer

    data = work_dir / "data"
    train = write_data(data, per_combo, seed, "train")
    write_data(data, 2, seed, "eval")
    hf_dir = work_dir / "hf_base"
    texts = [m["content"] for r in train for m in r["messages"]] * 2
    tokenizer = train_tokenizer(texts, hf_dir, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS) + ["<image>"]})
    tokenizer.save_pretrained(str(hf_dir))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor.save_pretrained(str(hf_dir))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                         image_seq_length=(IMAGE // PATCH) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    examples, _ = read_image_jsonl(data / "train.jsonl")
    english = [e for e in examples if e.domain == "en"]
    dataset = MultimodalDataset(english, tokenizer, processor, 24, image_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(pretrain_steps):
        rows = torch.randint(0, len(dataset), (16,), generator=generator).tolist()
        batch = collate([dataset.items[i] for i in rows], 24, dataset.pad_token_id, image_id)
        loss = hf_loss(model, batch, config.image_seq_length, image_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if pretrain_steps:
        print(f"quickstart: pretrained the LLaVA base {pretrain_steps} steps on English questions "
              f"(last loss {loss.item():.3f})", flush=True)
    model.save_pretrained(hf_dir)
    return hf_dir


def hf_loss(model, batch, image_seq_length: int, image_id: int):
    """transformers' LLaVA loss on a collated batch (the image token expanded as its processor does)."""
    import torch
    import torch.nn.functional as F

    from megatron_mole.checkpoint.llava import hf_input_ids

    ids = hf_input_ids(batch["input_ids"], image_id, image_seq_length)
    labels = torch.stack([torch.repeat_interleave(row, torch.where(ids_row == image_id, image_seq_length, 1))
                          for row, ids_row in zip(batch["labels"], batch["input_ids"])])
    labels[ids == image_id] = -100  # the image sits in the prompt: no loss there anyway
    logits = model(input_ids=ids, pixel_values=batch["images"]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def evaluate(hf_dir: Path, data_dir: Path, adapter: Path = None, show: int = 1) -> dict:
    """Per-language accuracy on ``eval.jsonl``: an answer counts when greedy decoding reproduces it
    exactly (every answer token and the end-of-turn token are the argmax given the tokens before,
    computed teacher-forced in one batched forward); ``show`` generations per language are printed."""
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    from megatron_mole.checkpoint.llava import hf_input_ids
    from megatron_mole.training.mm_data import MultimodalDataset, collate, read_image_jsonl

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    processor = CLIPImageProcessor.from_pretrained(hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    if adapter is not None:
        from megatron_mole.hf import load_mole_adapter

        load_mole_adapter(model, str(adapter))
    image_id, seq = model.config.image_token_id, model.config.image_seq_length
    examples, _ = read_image_jsonl(data_dir / "eval.jsonl")
    dataset = MultimodalDataset(examples, tokenizer, processor, 24, image_id)
    batch = collate(dataset.items, 24, dataset.pad_token_id, image_id)
    ids = hf_input_ids(batch["input_ids"], image_id, seq)

    def expand(values):
        return torch.stack([torch.repeat_interleave(v, torch.where(i == image_id, seq, 1))
                            for v, i in zip(values, batch["input_ids"])])

    projection = model.model.multi_modal_projector
    if hasattr(projection, "prompt_mask"):
        projection.prompt_mask = expand(batch["prompt_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=batch["images"]).logits
    if hasattr(projection, "prompt_mask"):
        projection.prompt_mask = None
    mask, labels = expand(batch["loss_mask"]) > 0, expand(batch["labels"])
    correct = ((logits.argmax(-1) == labels) | ~mask).all(-1)
    right, total = {}, {}
    for item, ok in zip(dataset.items, correct.tolist()):
        total[item["domain"]] = total.get(item["domain"], 0) + 1
        right[item["domain"]] = right.get(item["domain"], 0) + int(ok)
    for lang in sorted(total)[:4 if show else 0]:
        index = next(i for i, item in enumerate(dataset.items) if item["domain"] == lang)
        record = examples[index]
        prompt = tokenizer.apply_chat_template(list(record.messages[:1]), add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        prompt_ids = hf_input_ids(torch.tensor([prompt]), image_id, seq)
        with torch.no_grad():
            out = model.generate(input_ids=prompt_ids, pixel_values=batch["images"][index:index + 1],
                                 max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True)
        question = record.messages[0]["content"].replace("<image>\n", "")
        print(f"  [{lang}] {question!r} -> {answer!r} (expected {record.messages[1]['content']!r})", flush=True)
    return {lang: right[lang] / total[lang] for lang in sorted(total)}


def train_config(work_dir: Path, stage1_steps: int, stage2_steps: int, seed: int) -> dict:
    """The quickstart's ``megatron-mole train`` config (``DIR/config.yaml``), paths absolute: data
    parallel on 2 processes, MoLE on the LM (4 LoRA experts per MLP, top-1, fc1/fc2/qkv), Parrot
    (4 SwiGLU experts) with its stage 1 then stage 2, constant LR, no clipping."""
    work = work_dir.resolve()
    return {
        "base": {"checkpoint": str(work / "mcore"), "tokenizer": str(work / "hf_base")},
        "parallel": {"tp": 1, "pp": 1, "micro_batch": 4, "global_batch": 16},
        "mole": {"num_experts": 4, "rank": 8, "alpha": 16, "top_k": 1, "expert_scope": "mlp",
                 "targets": ["linear_fc1", "linear_fc2", "linear_qkv"], "seed": seed},
        "optimizer": {"lr": 3.0e-3, "clip_grad": 0.0, "distributed": True},
        "schedule": {"max_steps": stage1_steps + stage2_steps, "warmup_steps": 0, "decay_style": "constant"},
        "data": {"paths": [str(work / "data" / "train.jsonl")], "seq_length": 24},
        "logging": {"log_jsonl": str(work / "train.jsonl"), "interval": 20, "progress": False},
        "checkpoint": {"save_dir": str(work / "checkpoints"), "keep_last": 1},
        # alpha 1: the identity path keeps what stage 1 taught the LM about the visual tokens
        "multimodal": {"parrot": {"num_experts": 4, "ffn_hidden_size": 64, "alpha": 1.0,
                                  "stage1_steps": stage1_steps}},
        "seed": seed,
    }


def run(args) -> int:
    import shutil

    import torch
    import yaml

    from megatron_mole.training.quickstart import _rank_env, _run, convert

    torch.set_num_threads(1)
    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("hf_adapter", "data", "checkpoints"):
        if (work / stale).exists():
            shutil.rmtree(work / stale)
    hf_dir = build_base(work, args.seed, pretrain_steps=150)
    convert(hf_dir, work / "mcore")
    print("quickstart: the base answers (transformers):", flush=True)
    before = evaluate(hf_dir, work / "data")
    stage2 = max(1, args.max_steps)
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(train_config(work, max(1, stage2 // 4), stage2, args.seed), sort_keys=False))
    seconds = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
                    "-m", "megatron_mole", "train", "--config", str(config_path)],
                   f"train MoLE + Parrot on {NPROC} processes", env=_rank_env())
    print(f"quickstart: training took {seconds:.1f}s", flush=True)
    _run([sys.executable, "-m", "megatron_mole", "export", "--checkpoint", str(work / "checkpoints"),
          "--out", str(work / "hf_adapter")], "export", env=_rank_env())
    print("quickstart: the base with the exported adapter, projector and Parrot answers (transformers):", flush=True)
    after = evaluate(hf_dir, work / "data", work / "hf_adapter")
    print("quickstart: per-language accuracy on held-out images (base -> base + MoLE + Parrot):", flush=True)
    for lang in before:
        print(f"  {lang}: {before[lang]:.2f} -> {after[lang]:.2f}", flush=True)
    print(f"quickstart: done in {time.perf_counter() - start:.1f}s", flush=True)
    return 0

