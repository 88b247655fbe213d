"""Instruction data: bad-line handling, tokenisation against transformers' own assistant
masks, row building against a plain per-token loop, and packed attention against
unpacked forwards (transformers' Llama, Megatron's GPTModel).

Legend: S seq_length, L example length.
"""
import functools
import json

import numpy as np
import pytest
import torch

from megatron_mole.training import data as D
from megatron_mole.training.synthetic import generate_records, record_texts
from megatron_mole.training.tokenizer import train_tokenizer

# ChatML (Qwen2 style) with generation tags, so transformers can tell its assistant tokens.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{{ '\n' }}"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{{ '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "Reverse the words: red cat"},
        {"role": "assistant", "content": " cat red"}]


@functools.lru_cache(maxsize=1)
def _tokenizer_dir(tmp_root):
    train_tokenizer(record_texts(generate_records(64, seed=1)) + ["Be brief."], tmp_root, vocab_size=400)
    return tmp_root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_dir(str(tmp_path_factory.mktemp("tok"))))


def _write(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


GOOD = json.dumps({"domain": "a", "prompt": "hi", "response": "yo"})
BAD_LINES = [  # (line, substring the reason must contain)
    ("{not json", "invalid JSON"),
    (b'{"domain": "a", "prompt": "\xff", "response": "x"}', "invalid UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt": "p", "response": "r"}), "missing field 'domain'"),
    (json.dumps({"domain": "a", "prompt": "p"}), "missing field 'response'"),
    (json.dumps({"domain": "a"}), "missing field 'messages'"),
    (json.dumps({"domain": "a", "prompt": "p", "response": "  "}), "field 'response' is empty"),
    (json.dumps({"domain": "a", "messages": [{"role": "bot", "content": "x"}]}), "unknown role 'bot'"),
    (json.dumps({"domain": "a", "messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (json.dumps({"domain": "a", "messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "content": ""}]}), "messages[1].content"),
    (json.dumps({"domain": 3, "prompt": "p", "response": "r"}), "'domain' must be a string"),
    (json.dumps({"domain": "a", "messages": CHAT[2:4]}), "messages[0] is an assistant turn"),
    (json.dumps({"domain": "a", "prompt": "p", "response": "r", "messages": []}), "has both"),
]


def test_bad_lines_counted_with_line_numbers_and_skipped(tmp_path):
    lines = [GOOD, ""]
    for line, _ in BAD_LINES:
        lines += [line, GOOD]
    path = _write(tmp_path / "d.jsonl", lines)
    examples, report = D.read_jsonl(path)
    assert len(examples) == len(BAD_LINES) + 1
    assert [b.line for b in report.bad_lines] == [3 + 2 * i for i in range(len(BAD_LINES))]
    for bad, (_, reason) in zip(report.bad_lines, BAD_LINES):
        assert reason in bad.reason, (bad, reason)
        assert str(bad).startswith(f"{path}:{bad.line}: ")
    assert report.num_lines == len(lines) - 1  # the blank line is not counted
    assert f"{path}:3:" in report.summary()
    assert examples[0].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    assert examples[0].source == f"{path}:1"


def test_strict_raises_naming_first_bad_line(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, GOOD, BAD_LINES[0][0], BAD_LINES[3][0]])
    with pytest.raises(D.DataError, match=rf"{tmp_path}/d.jsonl:3: invalid JSON"):
        D.read_jsonl(path, strict=True)


@pytest.mark.parametrize("template", [None, CHATML], ids=["default", "chatml"])
def test_tokens_and_assistant_mask_match_transformers(tokenizer, template):
    messages = CHAT if template else CHAT[1:]
    ids_L, supervised_L = D.tokenize_messages(tokenizer, messages, template)
    reference = tokenizer.apply_chat_template(messages, chat_template=template or D.DEFAULT_CHAT_TEMPLATE,
                                              return_assistant_tokens_mask=True, return_dict=True)
    assert ids_L.tolist() == reference["input_ids"]
    assert supervised_L.tolist() == reference["assistant_masks"]
    decoded = tokenizer.decode(ids_L[supervised_L == 1])
    end = "<|im_end|>\n" if template else tokenizer.eos_token
    assert decoded == "5" + end + " cat red" + end


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    counting = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(D.DataError, match="not prefix-stable at messages\\[1\\]"):
        D.tokenize_messages(tokenizer, CHAT[1:3], counting)


def _example(ids, supervised, source="x"):
    return D.TokenizedExample(np.array(ids, dtype=np.int64), np.array(supervised, dtype=np.int8), source)


def _reference_row(examples, domains, S, pad):
    """Per-token loop: the stream of (token, supervised, example number, position)."""
    stream = []
    for number, (example, domain) in enumerate(zip(examples, domains), start=1):
        for position, (token, sup) in enumerate(zip(example.ids_L.tolist(), example.supervised_L.tolist())):
            stream.append((token, sup, number, position, domain))
    stream += [(pad, 0, 0, 0, -1)] * (S + 1 - len(stream))
    row = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "domain_ids")}
    for t in range(S):
        token, _, number, position, domain = stream[t]
        next_token, next_sup, next_number, _, _ = stream[t + 1]
        trained = next_sup == 1 and next_number == number and number > 0
        row["tokens"].append(token)
        row["labels"].append(next_token if trained else -100)
        row["loss_mask"].append(1.0 if trained else 0.0)
        row["position_ids"].append(position)
        row["segment_ids"].append(number)
        row["domain_ids"].append(domain)
    return row


def test_build_rows_matches_per_token_reference():
    S, pad = 12, 99
    groups = [[_example([0, 5, 6, 7], [0, 0, 1, 1]), _example([0, 8, 9], [0, 1, 1]), _example([0, 4], [0, 1])],
              [_example([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])],
              [_example([0, 3, 3], [0, 0, 1])]]
    domains = [[2, 0, 1], [1], [0]]
    rows = D.build_rows(groups, domains, S, pad)
    for r, (group, group_domains) in enumerate(zip(groups, domains)):
        reference = _reference_row(group, group_domains, S, pad)
        for key, values in reference.items():
            assert rows[key][r].tolist() == values, (r, key)
    assert rows["loss_mask"].dtype == torch.float32 and rows["tokens"].dtype == torch.int64
    with pytest.raises(D.DataError, match="need 14 tokens; a row holds seq_length\\+1=13"):
        D.build_rows([[_example(list(range(14)), [1] * 14)]], [[0]], S, pad)


def test_dataset_truncates_and_drops_examples_without_labels(tmp_path, tokenizer):
    long_prompt = " ".join(["red cat"] * 40)
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"domain": "a", "prompt": "hi", "response": "blue dog runs " * 20}),  # truncated, kept
        json.dumps({"domain": "b", "prompt": long_prompt, "response": "ok"}),  # response cut off: dropped
        json.dumps({"domain": "b", "prompt": "hi", "response": "ok"})])
    dataset = D.InstructionDataset.from_jsonl(path, tokenizer, seq_length=24)
    assert dataset.report.num_truncated == 2
    assert dataset.report.dropped_too_long == [f"{path}:2"]
    assert dataset.domain_sizes() == {"a": 1, "b": 1}
    assert len(dataset.examples[0][0].ids_L) == 25


def _reference_block_mask(segment_ids):
    S = len(segment_ids)
    masked = torch.ones(S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(S):
            if segment_ids[i] == 0:
                masked[i, j] = i != j
            else:
                masked[i, j] = not (j <= i and segment_ids[j] == segment_ids[i])
    return masked


def test_packed_attention_mask_matches_loop():
    segment_ids_BS = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    mask_B1SS = D.packed_attention_mask(segment_ids_BS)
    assert mask_B1SS.shape == (2, 1, 8, 8) and mask_B1SS.dtype == torch.bool
    for b in range(2):
        assert torch.equal(mask_B1SS[b, 0], _reference_block_mask(segment_ids_BS[b].tolist()))


def test_split_microbatches():
    batch = {"tokens": torch.arange(12).view(6, 2), "loss_mask": torch.ones(6, 2)}
    parts = D.split_microbatches(batch, 2)
    assert [p["tokens"][:, 0].tolist() for p in parts] == [[0, 2], [4, 6], [8, 10]]
    with pytest.raises(D.DataError, match="micro_batch_size=4 must divide the 6 rows"):
        D.split_microbatches(batch, 4)


def _packed_inputs(lengths, vocab, S):
    gen = torch.Generator().manual_seed(3)
    examples = [_example(torch.randint(0, vocab, (n,), generator=gen).tolist(), [1] * n) for n in lengths]
    rows = D.build_rows([examples], [[0] * len(examples)], S, pad_token_id=0)
    return examples, rows


def test_packed_row_equals_separate_examples_in_transformers_llama():
    """Restarted position ids + the block mask: each packed example sees only itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    examples, rows = _packed_inputs([5, 7, 3], 64, S=16)
    masked_11SS = D.packed_attention_mask(rows["segment_ids"])
    additive_11SS = torch.zeros(masked_11SS.shape).masked_fill(masked_11SS, torch.finfo(torch.float32).min)
    with torch.no_grad():
        packed_SV = model(rows["tokens"], attention_mask=additive_11SS, position_ids=rows["position_ids"]).logits[0]
        start = 0
        for example in examples:
            n = min(len(example.ids_L), 16 - start)
            alone_LV = model(torch.as_tensor(example.ids_L[None, :n])).logits[0]
            torch.testing.assert_close(packed_SV[start:start + n], alone_LV, atol=1e-5, rtol=1e-5)
            start += n


def megatron_packed_forward():
    """In a spawned rank: Megatron GPTModel (local spec, RoPE) on a packed row vs each example alone."""
    from megatron_mole.runtime import init_distributed
    from tests._models import build_gpt, seed_full_params

    init_distributed(device="cpu")
    model, _ = build_gpt(seq=16)
    seed_full_params(model, seed=5)
    model.eval()
    examples, rows = _packed_inputs([5, 7, 4], 128, S=16)
    diffs = []
    with torch.no_grad():
        packed_SV = model(rows["tokens"], rows["position_ids"], D.packed_attention_mask(rows["segment_ids"]))[0]
        start = 0
        for example in examples:
            tokens_1L = torch.as_tensor(example.ids_L[None, :16 - start])
            positions_1L = torch.arange(tokens_1L.shape[1])[None]
            alone_LV = model(tokens_1L, positions_1L, None)[0]
            diffs.append((packed_SV[start:start + tokens_1L.shape[1]] - alone_LV).abs().max().item())
            start += tokens_1L.shape[1]
    return diffs


def test_packed_row_equals_separate_examples_in_megatron_gpt():
    from tests._dist import run_distributed

    (diffs,) = run_distributed(megatron_packed_forward, 1, timeout=180)
    assert len(diffs) == 3 and max(diffs) < 1e-5, diffs


def test_domain_loss_sums_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    losses_BS = torch.rand(3, 7, generator=gen)
    loss_mask_BS = (torch.rand(3, 7, generator=gen) > 0.3).float()
    domain_ids_BS = torch.randint(-1, 3, (3, 7), generator=gen)
    loss_mask_BS[domain_ids_BS < 0] = 0
    loss_sum_D, tokens_D = D.domain_loss_sums(losses_BS, loss_mask_BS, domain_ids_BS, 3)
    for d in range(3):
        pairs = [(losses_BS[b, s].item(), loss_mask_BS[b, s].item()) for b in range(3) for s in range(7)
                 if domain_ids_BS[b, s] == d]
        assert loss_sum_D[d].item() == pytest.approx(sum(l * m for l, m in pairs), abs=1e-6)
        assert tokens_D[d].item() == sum(m for _, m in pairs)


def test_conversation_refused_by_the_template_is_a_bad_line(tmp_path, tokenizer):
    alternating = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "{{ m['role'] }}: {{ m['content'] }}{{ '\n' }}{% endfor %}")
    path = _write(tmp_path / "d.jsonl", [GOOD, json.dumps({"domain": "a", "messages": [CHAT[1], CHAT[3], CHAT[2]]})])
    examples, report = D.read_jsonl(path)
    dataset = D.InstructionDataset(examples, tokenizer, 32, chat_template=alternating, report=report)
    assert dataset.domain_sizes() == {"a": 1}
    assert [str(b) for b in report.bad_lines] == [
        f"{path}:2: the chat template refused it: roles must alternate user/assistant"]
    with pytest.raises(D.DataError, match=f"{path}:2: the chat template refused it"):
        D.InstructionDataset(examples, tokenizer, 32, chat_template=alternating, strict=True)


def test_tokenizer_without_template_uses_the_default_format(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    ids_L, supervised_L = D.tokenize_messages(bare, CHAT[1:3])
    assert bare.decode(ids_L) == "<s><|user|>\nWhat is 2 + 3?\n<|assistant|>\n5</s>"
    assert bare.decode(ids_L[supervised_L == 1]) == "5</s>"
