"""Image + text instruction data for LLaVA bases.

One JSON object per line::

    {"domain": "en", "image": "images/0001.png",
     "messages": [{"role": "user", "content": "<image>\\nWhat colour is the shape?"},
                  {"role": "assistant", "content": "red"}]}

``image`` is a path (relative paths are relative to the JSONL file); the conversation
follows data.py (roles, domain, at least one assistant turn) and must hold exactly one
image placeholder (``<image>``, the base tokenizer's image token), in a system or user
turn. Everything data.py calls a bad line is one here too, and so is a record whose image
is missing, unreadable or not an image, or whose placeholder count is not one: reported as
``path:line: reason`` and skipped (``strict=True`` raises on the first).

Images go through the base's own image processor (``CLIPImageProcessor`` of the
converted model: resize, crop, normalise), in float32. Text is tokenised with the chat
template as in data.py; the loss is on the assistant tokens only. The placeholder
becomes ONE image token (Megatron's LLaVAModel expands it to the image's tokens; the
loss mask and labels are expanded with it). Rows are padded to ``seq_length`` text
tokens (no packing: one image per row). ``prompt_mask`` marks the prompt's text tokens
(not the image token, not padding, not the answer): Parrot's text input.

Legend: B rows, S seq_length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from megatron_mole.training.data import (IGNORE_INDEX, BadLine, DataError, DataReport, _BadRecord, parse_record,
                                         read_jsonl, template_refusal, tokenize_messages)
from megatron_mole.training.sampler import GlobalBatchLoader

__all__ = ["ImageExample", "read_image_jsonl", "MultimodalDataset", "MultimodalBatchLoader", "collate"]

PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ImageExample:
    domain: str
    messages: tuple
    image: str
    path: str
    line: int

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise _BadRecord(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise _BadRecord(f"image {str(path)!r} cannot be read: {error}") from None


def parse_image_record(record, base: Path, placeholder: str = PLACEHOLDER):
    """(domain, messages, image path) of one decoded line; raises _BadRecord naming the problem."""
    domain, messages = parse_record(record)
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise _BadRecord(f"field 'image' must be a non-empty path string, got {image!r:.40}")
    count = sum(m["content"].count(placeholder) for m in messages)
    if any(placeholder in m["content"] for m in messages if m["role"] == "assistant"):
        raise _BadRecord(f"the image placeholder {placeholder!r} is in an assistant turn")
    if count != 1:
        raise _BadRecord(f"the messages hold {count} image placeholders {placeholder!r}; exactly one is supported")
    path = Path(image) if Path(image).is_absolute() else base / image
    return domain, messages, str(path)


def read_image_jsonl(paths, strict: bool = False, report: DataReport | None = None,
                     placeholder: str = PLACEHOLDER) -> tuple:
    """Read image instruction JSONL file(s) -> (list of ImageExample, DataReport). Images are
    opened here once (a missing or broken image is a bad line)."""

    def parse(raw: bytes, path: Path, number: int) -> ImageExample:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _BadRecord(f"invalid JSON or UTF-8 ({error})") from None
        domain, messages, image = parse_image_record(record, path.parent, placeholder)
        _open_image(Path(image))
        return ImageExample(domain, messages, image, str(path), number)

    return read_jsonl(paths, strict, report, parse=parse)


class MultimodalDataset:
    """Tokenised image examples: ``self.items`` of dicts with ``pixel_values`` [3, H, W],
    ``ids_L``, ``supervised_L`` and ``domain``; rows come from :func:`collate`."""

    def __init__(self, examples: Sequence[ImageExample], tokenizer, image_processor, seq_length: int,
                 image_token_id: int, report: DataReport | None = None, strict: bool = False,
                 chat_template: str | None = None):
        from jinja2 import TemplateError

        self.seq_length, self.image_token_id = seq_length, image_token_id
        self.report = report if report is not None else DataReport()
        self.pad_token_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self.items: List[dict] = []
        for example in examples:
            try:
                try:
                    ids_L, supervised_L = tokenize_messages(tokenizer, example.messages, chat_template)
                except TemplateError as error:
                    raise _BadRecord(template_refusal(error)) from None
                if int((ids_L == image_token_id).sum()) != 1:
                    raise _BadRecord(f"the placeholder did not tokenise to one image token (id {image_token_id}): "
                                     f"the tokenizer must hold it as a special token")
                pixels = image_processor(images=_open_image(Path(example.image)), return_tensors="pt")
                pixel_values = pixels["pixel_values"][0].float()
            except _BadRecord as error:
                self.report.add_bad_line(BadLine(example.path, example.line, str(error)), strict)
                continue
            if len(ids_L) > seq_length + 1:
                self.report.num_truncated += 1
                ids_L, supervised_L = ids_L[: seq_length + 1], supervised_L[: seq_length + 1]
            if not supervised_L[1:].any() or image_token_id not in ids_L[:-1]:
                self.report.dropped_too_long.append(example.source)
                continue
            self.items.append(dict(pixel_values=pixel_values, ids_L=ids_L, supervised_L=supervised_L,
                                   domain=example.domain, source=example.source))
            self.report.domain_counts[example.domain] += 1
        if not self.items:
            raise DataError(f"no usable example:\n{self.report.summary()}")
        # grouped by domain (sorted) as InstructionDataset, for the domain-mixing sampler
        self.domains = sorted({item["domain"] for item in self.items})
        self.examples = [[item for item in self.items if item["domain"] == d] for d in self.domains]

    def domain_sizes(self) -> dict:
        return {d: len(e) for d, e in zip(self.domains, self.examples)}

    @classmethod
    def from_jsonl(cls, paths, tokenizer, image_processor, seq_length: int, image_token_id: int,
                   strict: bool = False):
        examples, report = read_image_jsonl(paths, strict=strict)
        return cls(examples, tokenizer, image_processor, seq_length, image_token_id, report, strict)

    def __len__(self):
        return len(self.items)


def collate(items: Sequence[dict], seq_length: int, pad_token_id: int, image_token_id: int) -> dict:
    """Rows in Megatron's convention: ``input_ids`` [B, S] (one image token each), ``labels``
    (the next token; -100 off the loss), ``loss_mask`` (1 on assistant labels), ``prompt_mask``
    (the prompt's text tokens), ``images`` [B, 3, H, W]."""
    batch = len(items)
    tokens = np.full((batch, seq_length + 1), pad_token_id, dtype=np.int64)
    supervised = np.zeros((batch, seq_length + 1), dtype=np.int8)
    valid = np.zeros((batch, seq_length + 1), dtype=bool)
    for row, item in enumerate(items):
        n = len(item["ids_L"])
        tokens[row, :n], supervised[row, :n], valid[row, :n] = item["ids_L"], item["supervised_L"], True
    tokens_t = torch.from_numpy(tokens)
    loss_mask = torch.from_numpy(supervised[:, 1:].astype(np.float32))
    labels = torch.where(loss_mask > 0, tokens_t[:, 1:], torch.full_like(tokens_t[:, 1:], IGNORE_INDEX))
    inputs = tokens_t[:, :-1]
    prompt = torch.from_numpy(valid[:, :-1] & (supervised[:, :-1] == 0)) & (inputs != image_token_id)
    return dict(images=torch.stack([item["pixel_values"] for item in items]), input_ids=inputs, labels=labels,
                loss_mask=loss_mask, prompt_mask=prompt)


class MultimodalBatchLoader(GlobalBatchLoader):
    """``GlobalBatchLoader`` over a :class:`MultimodalDataset`: the same resumable domain-mixing
    stream, one example per row (no packing), rows from :func:`collate` plus ``domain_ids`` [B]
    and ``lengths`` [B] (text tokens of the row, padding excluded)."""

    def __init__(self, dataset: "MultimodalDataset", global_batch_size: int, **kwargs):
        if kwargs.get("packing"):
            raise DataError("image rows are not packed (one image per row): set data.packing: false")
        super().__init__(dataset, global_batch_size, **kwargs)

    def next_global_batch(self) -> dict:
        picks = [self.sampler.advance() for _ in range(self.global_batch_size)]
        items = [self.dataset.examples[d][i] for d, i in picks]
        data = self.dataset
        batch = collate(items, data.seq_length, data.pad_token_id, data.image_token_id)
        batch["domain_ids"] = torch.tensor([d for d, _ in picks], dtype=torch.int64)
        batch["lengths"] = torch.tensor([min(len(item["ids_L"]) - 1, data.seq_length) for item in items])
        return batch
