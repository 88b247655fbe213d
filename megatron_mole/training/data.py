"""Instruction data: JSONL records -> tokenised examples -> fixed-length training rows.

Record formats (one JSON object per line; other keys such as "id" are ignored):

    {"domain": "math", "messages": [{"role": "user", "content": "..."},
                                    {"role": "assistant", "content": "..."}, ...]}
    {"domain": "math", "prompt": "...", "response": "...", "system": "..."}   # system optional

Roles are ``system``, ``user`` and ``assistant``. A line is *bad* (counted, reported
as ``path:line: reason`` and skipped; ``strict=True`` raises on the first) when it
is not valid UTF-8/JSON or not an object, lacks ``domain`` or the messages /
prompt+response fields, has a field of the wrong type, an unknown role, no
assistant turn, starts with an assistant turn, has an empty (blank) assistant
turn or response, or the chat template refuses it. Blank lines are skipped
silently.

Tokenisation renders the conversation with the tokenizer's chat template, or
``DEFAULT_CHAT_TEMPLATE`` when it has none (the template that
``megatron_mole.training.tokenizer`` installs, so both paths give one format:
``<bos><|user|>\\n{prompt}\\n<|assistant|>\\n{response}<eos>``). Assistant turns are
found by rendering prefixes of the conversation (with and without the generation
prompt) and each segment is tokenised on its own, exactly as a prompt is
tokenised at inference before ``generate()`` continues it. Loss is only on the
assistant segments: the response text plus the template's end-of-turn tokens
(eos), so the model learns to stop.

Rows follow Megatron's GPT convention: ``labels[t]`` is the token after
``tokens[t]``; an example of L tokens fills L-1 positions, so a row of S positions
holds S+1 tokens. ``labels`` is -100 and ``loss_mask`` 0 wherever the label is not
an assistant token (prompts, padding, the step from one packed example into the
next). Longer examples are truncated to S+1 tokens (counted); one left with no
supervised label is dropped (counted).

Packing (``packing=True``) places whole consecutive examples of the sampler's
stream into a row while they fit (an example that does not fit starts the next
row; nothing is split). ``position_ids`` restart at 0 for each packed example and
``segment_ids`` number the examples of a row 1, 2, ... (0 = padding). Megatron's
GPTModel with RoPE ignores ``position_ids`` (rotary positions run over the whole
row), but RoPE is relative, so once attention is confined to each example with
``packed_attention_mask(segment_ids)`` every example computes what it would
alone. Without that mask, packed examples attend to earlier ones in their row.

Legend: G global batch (rows), B rows on this rank, S seq_length, L example length.
"""
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from megatron_mole.errors import MoleError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
MAX_REPORTED_BAD_LINES = 20

# Jinja as transformers renders it (trim_blocks: newlines are written as {{ '\n' }}).
# `{% generation %}` lets transformers' return_assistant_tokens_mask find the same spans.
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\n' }}{% endif %}"
)


class DataError(MoleError, ValueError):
    """A bad data line under ``strict=True``, or data that cannot be used at all."""


class _BadRecord(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    domain: str
    messages: tuple  # of {"role", "content"} dicts, validated
    path: str = "<memory>"
    line: int = 0

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class BadLine:
    path: str
    line: int
    reason: str

    def __str__(self):
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class DataReport:
    """What reading and tokenising found; ``summary()`` is what the loop prints on rank 0."""

    num_lines: int = 0
    bad_lines: list = field(default_factory=list)
    domain_counts: Counter = field(default_factory=Counter)
    num_truncated: int = 0
    dropped_too_long: list = field(default_factory=list)  # sources of examples left without labels
    # Counted but not listed (a preprocessed dataset keeps only the first bad lines and dropped sources).
    more_bad_lines: int = 0
    more_dropped: int = 0

    @property
    def num_bad_lines(self) -> int:
        return len(self.bad_lines) + self.more_bad_lines

    def add_bad_line(self, bad: "BadLine", strict: bool) -> None:
        """Record a line that cannot be used; with ``strict`` refuse the data instead."""
        if strict:
            raise DataError(f"bad data line {bad} (strict=True)") from None
        self.bad_lines.append(bad)

    def summary(self) -> str:
        kept = sum(self.domain_counts.values())
        domains = ", ".join(f"{d}={n}" for d, n in sorted(self.domain_counts.items()))
        text = [f"data: {self.num_lines} lines, {kept} examples ({domains}), "
                f"{self.num_bad_lines} bad lines skipped, {self.num_truncated} truncated, "
                f"{len(self.dropped_too_long) + self.more_dropped} dropped "
                f"(no response token left after truncation)"]
        text += [f"  bad line {b}" for b in self.bad_lines[:MAX_REPORTED_BAD_LINES]]
        if self.num_bad_lines > MAX_REPORTED_BAD_LINES:
            text.append(f"  ... and {self.num_bad_lines - MAX_REPORTED_BAD_LINES} more bad lines")
        return "\n".join(text)


def _string(record, key, *, nonempty=False, where=None):
    where = where or f"field {key!r}"
    if key not in record:
        raise _BadRecord(f"missing {where}")
    value = record[key]
    if not isinstance(value, str):
        raise _BadRecord(f"{where} must be a string, got {type(value).__name__} {value!r:.40}")
    if nonempty and not value.strip():
        raise _BadRecord(f"{where} is empty")
    return value


def parse_record(record) -> tuple:
    """(domain, messages) of one decoded JSON line; raises _BadRecord naming the problem."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    domain = _string(record, "domain", nonempty=True)
    has_chat, has_pair = "messages" in record, ("prompt" in record or "response" in record)
    if has_chat and has_pair:
        raise _BadRecord("has both 'messages' and 'prompt'/'response'; use one format")
    if not has_chat and not has_pair:
        raise _BadRecord("missing field 'messages' (or 'prompt' and 'response')")
    if has_pair:
        messages = []
        if "system" in record:
            messages.append({"role": "system", "content": _string(record, "system")})
        messages.append({"role": "user", "content": _string(record, "prompt")})
        messages.append({"role": "assistant", "content": _string(record, "response", nonempty=True)})
        return domain, tuple(messages)
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise _BadRecord(f"field 'messages' must be a non-empty list, got {raw!r:.40}")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise _BadRecord(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = _string(message, "role", where=f"messages[{i}].role")
        if role not in ROLES:
            raise _BadRecord(f"messages[{i}].role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _string(message, "content", nonempty=role == "assistant",
                          where=f"messages[{i}].content ({role})")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("no assistant message (nothing to train on)")
    if messages[0]["role"] == "assistant":  # nothing to prompt it; chat templates cannot render the prefix
        raise _BadRecord("messages[0] is an assistant turn; a conversation starts with a system or user message")
    return domain, tuple(messages)


def parse_line(raw: bytes) -> tuple:
    """(domain, messages) of one non-blank JSONL line; raises _BadRecord naming the problem."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise _BadRecord(f"invalid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise _BadRecord(f"invalid JSON ({error.msg} at column {error.colno})") from None
    return parse_record(record)


def read_jsonl(paths, strict: bool = False, report: DataReport | None = None, parse=None) -> tuple:
    """Read instruction JSONL file(s) -> (list of Example, DataReport).

    Bad lines are recorded in the report and skipped; with ``strict`` the first one
    raises DataError("path:line: reason"). ``parse(raw, path, number)`` reads another
    record format (mm_data.py's image records) and raises _BadRecord on a bad line.
    """
    report = report if report is not None else DataReport()
    examples = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                report.num_lines += 1
                try:
                    if parse is None:
                        domain, messages = parse_line(raw)
                        example = Example(domain, messages, str(path), number)
                    else:
                        example = parse(raw, Path(path), number)
                except _BadRecord as error:
                    report.add_bad_line(BadLine(str(path), number, str(error)), strict)
                    continue
                examples.append(example)
    return examples, report


def render_segments(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> list:
    """Split the rendered conversation into [(text, is_assistant), ...] covering it exactly.

    The span of assistant turn i is render(messages[:i+1]) minus
    render(messages[:i], add_generation_prompt=True); this needs templates whose
    renderings of prefixes are prefixes of the whole (true for the common ones).
    """
    # None lets transformers pick the tokenizer's own template (which may be a dict of named ones).
    template = chat_template or (None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE)

    def render(prefix, generation_prompt):
        return tokenizer.apply_chat_template(list(prefix), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    def check_prefix(prefix, whole, i):
        if not whole.startswith(prefix):
            raise DataError(
                f"chat template is not prefix-stable at messages[{i}]: the rendering of the conversation "
                f"before it ({prefix[-60:]!r}) does not start the rendering with it ({whole[-60:]!r}); "
                f"pass a chat_template whose turns only append")

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[: i + 1], False)
        check_prefix(done, before, i)
        check_prefix(before, after, i)
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    whole = render(messages, False)
    check_prefix(done, whole, len(messages) - 1)
    segments.append((whole[len(done):], False))
    return [(text, is_assistant) for text, is_assistant in segments if text]


def tokenize_messages(tokenizer, messages: Sequence[dict], chat_template: str | None = None) -> tuple:
    """(ids_L, supervised_L): token ids and 1 where the token belongs to an assistant turn."""
    ids, supervised = [], []
    for text, is_assistant in render_segments(tokenizer, messages, chat_template):
        segment = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += segment
        supervised += [int(is_assistant)] * len(segment)
    return np.asarray(ids, dtype=np.int64), np.asarray(supervised, dtype=np.int8)


def template_refusal(error) -> str:
    """The bad-line reason of a conversation the chat template raised on (both data paths)."""
    return f"the chat template refused it: {error}"


def effective_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """The template text tokenisation renders with (a dict of named templates as sorted JSON)."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return template if isinstance(template, str) else json.dumps(template, sort_keys=True)


@dataclass(frozen=True)
class TokenizedExample:
    ids_L: np.ndarray
    supervised_L: np.ndarray
    source: str


class InstructionDataset:
    """Tokenised examples grouped by domain (domains sorted by name).

    A conversation the chat template itself refuses (templates may raise, e.g. on
    roles that do not alternate) is a bad line like any other: reported and
    skipped, or an error under ``strict``.
    """

    def __init__(self, examples: Iterable[Example], tokenizer, seq_length: int,
                 chat_template: str | None = None, report: DataReport | None = None, strict: bool = False):
        from jinja2 import TemplateError

        if seq_length < 2:
            raise DataError(f"seq_length must be >= 2, got {seq_length}")
        self.seq_length = seq_length
        self.report = report if report is not None else DataReport()
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        by_domain = {}
        for example in examples:
            try:
                ids_L, supervised_L = tokenize_messages(tokenizer, example.messages, chat_template)
            except TemplateError as error:
                self.report.add_bad_line(BadLine(example.path, example.line, template_refusal(error)), strict)
                continue
            if len(ids_L) > seq_length + 1:  # a row of S positions holds S+1 tokens
                self.report.num_truncated += 1
                ids_L, supervised_L = ids_L[: seq_length + 1], supervised_L[: seq_length + 1]
            if not supervised_L[1:].any():
                self.report.dropped_too_long.append(example.source)
                continue
            by_domain.setdefault(example.domain, []).append(TokenizedExample(ids_L, supervised_L, example.source))
            self.report.domain_counts[example.domain] += 1
        if not by_domain:
            raise DataError(f"no usable example:\n{self.report.summary()}")
        self.domains = sorted(by_domain)
        self.examples = [by_domain[d] for d in self.domains]

    @classmethod
    def from_jsonl(cls, paths, tokenizer, seq_length: int, strict: bool = False,
                   chat_template: str | None = None):
        examples, report = read_jsonl(paths, strict=strict)
        return cls(examples, tokenizer, seq_length, chat_template, report, strict)

    def domain_sizes(self) -> dict:
        return {d: len(e) for d, e in zip(self.domains, self.examples)}


def build_rows(groups: Sequence[Sequence[TokenizedExample]], domain_ids: Sequence[Sequence[int]],
               seq_length: int, pad_token_id: int) -> dict:
    """Rows of int64/float tensors [len(groups), S] from groups of examples (one group per row)."""
    S = seq_length
    n = len(groups)
    tokens = np.full((n, S + 1), pad_token_id, dtype=np.int64)
    supervised = np.zeros((n, S + 1), dtype=np.int8)
    position_ids = np.zeros((n, S + 1), dtype=np.int64)
    segment_ids = np.zeros((n, S + 1), dtype=np.int64)
    domains = np.full((n, S + 1), -1, dtype=np.int64)
    for row, (group, group_domains) in enumerate(zip(groups, domain_ids)):
        start = 0
        for number, (example, domain) in enumerate(zip(group, group_domains), start=1):
            end = start + len(example.ids_L)
            if end > S + 1:
                raise DataError(f"examples of row {row} need {end} tokens; a row holds seq_length+1={S + 1}")
            tokens[row, start:end] = example.ids_L
            supervised[row, start:end] = example.supervised_L
            position_ids[row, start:end] = np.arange(end - start)
            segment_ids[row, start:end] = number
            domains[row, start:end] = domain
            start = end
    # Label t is token t+1; it is trained only when it is an assistant token of the same example.
    same_example = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    loss_mask = (supervised[:, 1:] == 1) & same_example
    labels = np.where(loss_mask, tokens[:, 1:], IGNORE_INDEX)
    as_tensor = torch.from_numpy
    return {
        "tokens": as_tensor(tokens[:, :S].copy()),
        "labels": as_tensor(labels),
        "loss_mask": as_tensor(loss_mask.astype(np.float32)),
        "position_ids": as_tensor(position_ids[:, :S].copy()),
        "segment_ids": as_tensor(segment_ids[:, :S].copy()),
        "domain_ids": as_tensor(domains[:, :S].copy()),
    }


def packed_attention_mask(segment_ids_BS: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, S, S], True = masked (Megatron's convention).

    A token attends to earlier tokens of its own example; padding (segment 0) attends
    to itself only, which keeps its softmax finite.
    """
    S = segment_ids_BS.shape[1]
    same_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=segment_ids_BS.device).tril()
    padding_BSS = (segment_ids_BS == 0)[:, :, None] & ~torch.eye(S, dtype=torch.bool, device=segment_ids_BS.device)
    return ~(same_BSS & causal_SS & ~padding_BSS)[:, None]


def domain_loss_sums(losses_BS: torch.Tensor, loss_mask_BS: torch.Tensor, domain_ids_BS: torch.Tensor,
                     num_domains: int) -> tuple:
    """(loss_sum_D, tokens_D): masked per-token losses and trained-token counts summed per domain.

    Sums, not means, so that the loop can all-reduce them over data-parallel ranks
    and micro batches before dividing. Padding (domain -1) has loss_mask 0.
    """
    weights_N = loss_mask_BS.reshape(-1).to(torch.float32)
    domains_N = domain_ids_BS.reshape(-1).clamp(min=0).to(losses_BS.device)
    weights_N = weights_N.to(losses_BS.device)
    loss_sum_D = torch.zeros(num_domains, dtype=torch.float32, device=losses_BS.device)
    tokens_D = torch.zeros(num_domains, dtype=torch.float32, device=losses_BS.device)
    loss_sum_D.index_add_(0, domains_N, losses_BS.reshape(-1).detach().float() * weights_N)
    tokens_D.index_add_(0, domains_N, weights_N)
    return loss_sum_D, tokens_D


def split_microbatches(batch: dict, micro_batch_size: int) -> list:
    """Cut a rank's rows [B, S] into B / micro_batch_size dicts (the schedule's micro batches)."""
    rows = next(iter(batch.values())).shape[0]
    if micro_batch_size <= 0 or rows % micro_batch_size:
        raise DataError(f"micro_batch_size={micro_batch_size} must divide the {rows} rows of this rank")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, rows, micro_batch_size)]
