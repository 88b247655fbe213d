"""A small synthetic multi-domain instruction dataset for the quickstart.

Four domains, each a rule a tiny model can learn, over one shared word list so
that the instruction (not the vocabulary) tells the domains apart, which is what
MoLE routing can specialise on:

- ``arithmetic``: "What is 7 + 5?" -> "12" (sums and differences of single digits);
- ``reverse``: "Reverse the words: red cat" -> "cat red";
- ``translate``: "Translate to Zorbish: red cat" -> "vok zim" (a fixed word map);
- ``capitalize``: "Capitalize each word: red cat" -> "Red Cat".

(two words a prompt: see ``WORDS_PER_PROMPT``).

Everything is a function of the seed (``random.Random(seed)``). Records alternate
between the ``messages`` and the ``prompt``/``response`` formats (every third one is
prompt/response) so that both reach the data code.
"""
import json
import os
import random
from pathlib import Path

DOMAINS = ("arithmetic", "reverse", "translate", "capitalize")

WORDS = ("red", "blue", "green", "cat", "dog", "bird", "fish", "tree", "house", "river", "sun", "moon",
         "runs", "sees", "eats", "jumps", "big", "small", "old", "new", "the", "a", "near", "under")
# One made-up word per entry of WORDS (same order); each is unique so the map is invertible.
ZORBISH = ("vok", "dru", "nel", "zim", "pax", "tiro", "gume", "sol", "kerb", "lumo", "ash", "ny",
           "prel", "vash", "oom", "kip", "bara", "tet", "yul", "fen", "ka", "o", "mir", "tuv")
TRANSLATION = dict(zip(WORDS, ZORBISH))
# Two words a prompt and single-digit arithmetic: the frozen tiny base (2 layers, hidden 64) plus
# adapters learns these in the quickstart's ~150 steps; longer, variable-length word lists need the
# base to copy sequences of any length, which it cannot learn that fast (0% exact match measured).
WORDS_PER_PROMPT = 2


def make_example(domain: str, rng: random.Random) -> tuple:
    """(prompt, response) of one example of ``domain``."""
    if domain == "arithmetic":
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b)
    words = [rng.choice(WORDS) for _ in range(WORDS_PER_PROMPT)]
    text = " ".join(words)
    if domain == "reverse":
        return f"Reverse the words: {text}", " ".join(reversed(words))
    if domain == "translate":
        return f"Translate to Zorbish: {text}", " ".join(TRANSLATION[w] for w in words)
    if domain == "capitalize":
        return f"Capitalize each word: {text}", " ".join(w.capitalize() for w in words)
    raise ValueError(f"unknown synthetic domain {domain!r}; choose from {DOMAINS}")


def generate_records(examples_per_domain: int = 256, seed: int = 0) -> list:
    """JSONL-ready records, ``examples_per_domain`` of each domain, in a seeded shuffled order."""
    rng = random.Random(seed)
    pairs = [(d, *make_example(d, rng)) for d in DOMAINS for _ in range(examples_per_domain)]
    rng.shuffle(pairs)
    records = []
    for i, (domain, prompt, response) in enumerate(pairs):
        if i % 3 == 2:
            records.append({"domain": domain, "prompt": prompt, "response": response})
        else:
            records.append({"domain": domain, "messages": [{"role": "user", "content": prompt},
                                                           {"role": "assistant", "content": response}]})
    return records


def record_texts(records) -> list:
    """The prompt and response strings of records (a tokenizer-training corpus)."""
    texts = []
    for record in records:
        if "messages" in record:
            texts += [m["content"] for m in record["messages"]]
        else:
            texts += [record["prompt"], record["response"]]
    return texts


def skill_text(domain: str, prompt: str, response: str) -> str:
    """The rule of one example stated as plain text, without the instruction
    ("7 + 5 = 12", "red cat backwards is cat red", "red cat in Zorbish is vok zim",
    "red cat in capitals is Red Cat"): what a base meets in pretraining."""
    if domain == "arithmetic":
        return f"{prompt.removeprefix('What is ').removesuffix('?')} = {response}"
    cue = {"reverse": "backwards is", "translate": "in Zorbish is", "capitalize": "in capitals is"}[domain]
    return f"{prompt.split(': ', 1)[1]} {cue} {response}"


def skill_texts(examples_per_domain: int, seed: int = 1) -> list:
    """Plain-text statements of fresh examples of every domain (``skill_text``), seeded."""
    rng = random.Random(seed)
    return [skill_text(d, *make_example(d, rng)) for d in DOMAINS for _ in range(examples_per_domain)]


def write_instruction_dataset(work_dir, examples_per_domain: int = 256, seed: int = 0) -> Path:
    """Write ``work_dir/data/train.jsonl`` (atomically: a temporary file, then rename) and return its path."""
    path = Path(work_dir) / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "w", encoding="utf-8") as handle:
        for record in generate_records(examples_per_domain, seed):
            handle.write(json.dumps(record) + "\n")
    os.replace(partial, path)
    return path


def demo_prompts(per_domain: int = 1, seed: int = 10_000) -> list:
    """[(domain, prompt, expected response)] for showing generations (a seed apart from training's)."""
    rng = random.Random(seed)
    return [(d, *make_example(d, rng)) for d in DOMAINS for _ in range(per_domain)]


def heldout_prompts(per_domain: int, train_records, seed: int = 20_000) -> list:
    """[(domain, prompt, expected response)]: ``per_domain`` examples of each domain whose prompt
    is not among ``train_records``' prompts (distinct, seeded), for measuring accuracy."""
    seen = set()
    for record in train_records:
        seen.add(record["prompt"] if "prompt" in record else record["messages"][0]["content"])
    rng = random.Random(seed)
    out = []
    for domain in DOMAINS:
        picked = {}
        for _ in range(200 * per_domain):
            if len(picked) == per_domain:
                break
            prompt, response = make_example(domain, rng)
            if prompt not in seen:
                picked.setdefault(prompt, response)
        out += [(domain, prompt, response) for prompt, response in picked.items()]
    return out
