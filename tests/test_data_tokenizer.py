"""The locally trained tokenizer (loaded back through transformers) and the synthetic dataset."""
import json
import random
import re

import pytest

from megatron_mole.training import data as D
from megatron_mole.training import synthetic as S
from megatron_mole.training.tokenizer import SPECIAL_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(S.record_texts(S.generate_records(32)), out, vocab_size=384)
    return out


def test_saved_tokenizer_loads_with_special_tokens_and_template(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert len(tokenizer) <= 384
    messages = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s><|user|>\nWhat is 1 + 2?\n<|assistant|>\n3</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nWhat is 1 + 2?\n<|assistant|>\n"
    # role markers are single tokens
    assert tokenizer("<|assistant|>", add_special_tokens=False)["input_ids"] == [5]
    # plain encoding prepends bos, as Llama's tokenizer does
    assert tokenizer("red cat")["input_ids"][0] == tokenizer.bos_token_id


def test_byte_level_encodes_any_text(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x2FFF), 0x1F600]))
                       for _ in range(rng.randrange(1, 30)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_vocab_size_below_byte_alphabet_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must exceed 262"):
        train_tokenizer(["abc"], tmp_path, vocab_size=100)


def _check_rule(domain, prompt, response):
    """Independent statement of each domain's rule."""
    if domain == "arithmetic":
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt).groups()
        return int(response) == (int(a) + int(b) if op == "+" else int(a) - int(b)) and int(response) >= 0
    instruction, words = prompt.split(": ", 1)
    if domain == "reverse":
        return instruction == "Reverse the words" and response.split() == words.split()[::-1]
    if domain == "translate":
        inverse = dict(zip(S.ZORBISH, S.WORDS))
        return instruction == "Translate to Zorbish" and " ".join(inverse[w] for w in response.split()) == words
    return instruction == "Capitalize each word" and response == words.title()


def test_synthetic_records_follow_their_rules_and_are_deterministic():
    records = S.generate_records(50, seed=3)
    assert records == S.generate_records(50, seed=3)
    assert records != S.generate_records(50, seed=4)
    counts = {d: 0 for d in S.DOMAINS}
    for record in records:
        domain, messages = D.parse_record(record)
        counts[domain] += 1
        assert _check_rule(domain, messages[-2]["content"], messages[-1]["content"]), record
    assert counts == {d: 50 for d in S.DOMAINS}
    assert len(set(S.ZORBISH)) == len(S.WORDS)
    for domain, prompt, response in S.demo_prompts(per_domain=2):
        assert _check_rule(domain, prompt, response)


def test_written_dataset_reads_back_without_bad_lines(tmp_path):
    path = S.write_instruction_dataset(tmp_path, examples_per_domain=20, seed=1)
    assert path == tmp_path / "data" / "train.jsonl"
    examples, report = D.read_jsonl(path, strict=True)
    assert len(examples) == 80 and not report.bad_lines
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {"messages" in r for r in lines} == {True, False}  # both record formats present
    assert not list(tmp_path.glob("data/*.tmp"))
