"""Preprocessed instruction data: a directory that every rank memory-maps (``data.prefix``).

Layout of a directory written by ``megatron-mole preprocess`` (preprocess.py):

    tokens.bin/.idx   Megatron-core IndexedDataset: the token ids of example i as sequence i
                      (uint16 when the vocabulary fits, else int32), untruncated
    spans.bin/.idx    IndexedDataset (int32): example i's assistant spans, [start, end) pairs flattened
    examples.npy      one record per example: domain id, source file index, line, first_label
                      (the first position >= 1 that is an assistant token; INT32_MAX when none)
    bad_lines.txt     every bad line as ``path:line: reason``
    meta.json         domains, sources, counts, the first bad lines, pad id, and the fingerprint:
                      sha256 of the tokenizer's files and of the chat template it rendered with

Opening one costs the index arrays only: token ids are read from the memory map when
the sampler picks an example, so start-up time and memory per rank do not grow with
the size of the text. Truncation to seq_length and dropping an example left without a
supervised label are decided here from the lengths and ``first_label`` (the JSONL path
decides them after tokenising), so a prefix serves every seq_length and both paths
give the same examples, in the same order per domain: file order, the prefixes in the
order listed (like ``data.paths``).
"""
import hashlib
import json
from pathlib import Path

import numpy as np

from megatron_mole.training.data import (MAX_REPORTED_BAD_LINES, BadLine, DataError, DataReport, TokenizedExample,
                                         effective_chat_template)

FORMAT = "megatron_mole.instruction.v1"
TOKENS, SPANS, EXAMPLES, META, BAD_LINES = "tokens", "spans", "examples.npy", "meta.json", "bad_lines.txt"
EXAMPLE_DTYPE = np.dtype([("domain", np.int32), ("file", np.int32), ("line", np.int64), ("first_label", np.int32)])
NO_LABEL = np.iinfo(np.int32).max
# The files that make a Hugging Face tokenizer (those present are hashed, with their names).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer_dir) -> str:
    """sha256 over the names and bytes of the tokenizer files in ``tokenizer_dir``."""
    digest = hashlib.sha256()
    found = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
    if not found:
        raise DataError(f"tokenizer directory {tokenizer_dir} holds none of {', '.join(TOKENIZER_FILES)}")
    for name in found:
        digest.update(name.encode() + b"\0" + (Path(tokenizer_dir) / name).read_bytes() + b"\0")
    return digest.hexdigest()


def spans_of(supervised_L: np.ndarray) -> np.ndarray:
    """[start0, end0, start1, end1, ...] (int32) of the runs of 1 in ``supervised_L``."""
    edges = np.diff(np.concatenate([[0], supervised_L.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).reshape(-1).astype(np.int32)


def first_label(supervised_L: np.ndarray) -> int:
    hits = np.flatnonzero(supervised_L[1:])
    return int(hits[0]) + 1 if len(hits) else int(NO_LABEL)


def _supervised(spans: np.ndarray, length: int) -> np.ndarray:
    supervised = np.zeros(length, dtype=np.int8)
    for start, end in spans.reshape(-1, 2):
        supervised[start:end] = 1
    return supervised


class _Prefix:
    """One preprocessed directory, memory-mapped."""

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise DataError(f"data.prefix {self.path}: no {META} (not a `megatron-mole preprocess` output, "
                            f"or an unfinished one)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise DataError(f"data.prefix {self.path}: format {self.meta.get('format')!r}, expected {FORMAT!r}; "
                            f"preprocess it again")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens = IndexedDataset(str(self.path / TOKENS))
        self.spans = IndexedDataset(str(self.path / SPANS))
        self.rows = np.load(self.path / EXAMPLES, mmap_mode="r")
        if not len(self.rows) == len(self.tokens) == len(self.spans) == self.meta["num_examples"]:
            raise DataError(f"data.prefix {self.path}: {len(self.rows)} example records, {len(self.tokens)} token "
                            f"sequences, {len(self.spans)} span lists, meta.json says {self.meta['num_examples']}")

    def check_tokenizer(self, tokenizer_dir, tokenizer):
        ours = (tokenizer_fingerprint(tokenizer_dir), sha256_text(effective_chat_template(tokenizer)))
        theirs = (self.meta["tokenizer_sha256"], self.meta["chat_template_sha256"])
        if ours != theirs:
            what = " and ".join(w for w, a, b in zip(("tokenizer files", "chat template"), ours, theirs) if a != b)
            raise DataError(
                f"data.prefix {self.path} was tokenised with tokenizer {self.meta['tokenizer']} "
                f"(files sha256 {theirs[0][:12]}, chat template sha256 {theirs[1][:12]}); this run's tokenizer "
                f"{tokenizer_dir} differs in its {what} (files sha256 {ours[0][:12]}, chat template sha256 "
                f"{ours[1][:12]}): run megatron-mole preprocess again with --tokenizer {tokenizer_dir}")


class _DomainView:
    """The examples of one domain across prefixes, as a read-only sequence of TokenizedExample."""

    def __init__(self, dataset, prefix_ids, indices):
        self.dataset, self.prefix_ids, self.indices = dataset, prefix_ids, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k: int) -> TokenizedExample:
        prefix = self.dataset.prefixes[self.prefix_ids[k]]
        i = int(self.indices[k])
        ids_L = prefix.tokens.get(i).astype(np.int64)
        supervised_L = _supervised(prefix.spans.get(i), len(ids_L))
        keep = self.dataset.seq_length + 1  # a row of S positions holds S+1 tokens
        return TokenizedExample(ids_L[:keep], supervised_L[:keep], self.dataset._source(prefix, i))


class IndexedInstructionDataset:
    """Drop-in for ``InstructionDataset`` (same ``domains``, ``examples[d][k]``, ``report``) over prefixes."""

    def __init__(self, prefixes, tokenizer_dir, seq_length: int, strict: bool = False, tokenizer=None):
        if seq_length < 2:
            raise DataError(f"seq_length must be >= 2, got {seq_length}")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.seq_length = seq_length
        self.prefixes = [_Prefix(p) for p in ([prefixes] if isinstance(prefixes, (str, Path)) else prefixes)]
        for prefix in self.prefixes:
            prefix.check_tokenizer(tokenizer_dir, tokenizer)
        self.pad_token_id = self.prefixes[0].meta["pad_token_id"]
        self.report = report = DataReport()
        parts = {}  # domain -> [(prefix id, example indices)]
        for p, prefix in enumerate(self.prefixes):
            meta = prefix.meta
            report.num_lines += meta["num_lines"]
            if strict and meta["num_bad_lines"]:
                raise DataError(f"bad data line {BadLine(*meta['first_bad_lines'][0])} (strict=True)")
            room = MAX_REPORTED_BAD_LINES - len(report.bad_lines)
            report.bad_lines += [BadLine(*b) for b in meta["first_bad_lines"][:max(room, 0)]]
            report.more_bad_lines += meta["num_bad_lines"] - min(max(room, 0), len(meta["first_bad_lines"]))
            kept_N = prefix.rows["first_label"] <= seq_length  # JSONL path: supervised_L[1:S+1].any()
            domain_N = prefix.rows["domain"]
            # counted before dropping, as the JSONL path does
            report.num_truncated += int(np.count_nonzero(prefix.tokens.sequence_lengths > seq_length + 1))
            dropped = np.flatnonzero(~kept_N)
            report.dropped_too_long += [self._source(prefix, i) for i in dropped[:MAX_REPORTED_BAD_LINES]]
            report.more_dropped += max(len(dropped) - MAX_REPORTED_BAD_LINES, 0)
            for d, name in enumerate(meta["domains"]):
                indices = np.flatnonzero(kept_N & (domain_N == d))
                if len(indices):
                    parts.setdefault(name, []).append((p, indices))
                    report.domain_counts[name] += len(indices)
        if not parts:
            raise DataError(f"no usable example:\n{report.summary()}")
        self.domains = sorted(parts)
        self.examples = []
        for name in self.domains:
            prefix_ids = np.concatenate([np.full(len(ix), p, dtype=np.int16) for p, ix in parts[name]])
            self.examples.append(_DomainView(self, prefix_ids, np.concatenate([ix for _, ix in parts[name]])))

    @staticmethod
    def _source(prefix, i) -> str:
        row = prefix.rows[i]
        return f"{prefix.meta['sources'][int(row['file'])]}:{int(row['line'])}"

    def domain_sizes(self) -> dict:
        return {d: len(e) for d, e in zip(self.domains, self.examples)}
