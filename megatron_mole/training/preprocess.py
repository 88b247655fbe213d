"""`megatron-mole preprocess`: instruction data -> an indexed, memory-mapped dataset directory.

    megatron-mole preprocess --data a.jsonl b.jsonl --tokenizer work/hf --out data/mix [--workers 4]

Inputs: JSONL files (``megatron_mole.training.data``'s record formats) and Hugging
Face ``datasets`` saved locally (a ``Dataset.save_to_disk`` directory, a ``.parquet``
or an ``.arrow`` file; rows have the JSONL records' fields, a null field counts as
absent). Each record is parsed and tokenised by the very functions the JSONL
training path uses (``parse_line``/``parse_record``, ``tokenize_messages``), so
both paths train on identical rows; bad lines get the same reasons.

Output: the directory ``--out`` (see ``indexed.py`` for the layout): token ids
and the assistant spans as two Megatron-core ``IndexedDataset``s (one sequence
per example, untruncated: ``train`` truncates to its own seq_length), a
per-example array (domain, source file and line, first supervised position),
every bad line, and ``meta.json`` with the tokenizer's fingerprint.

Workers: chunks of records go to ``--workers`` forked processes, at most
``2 x workers`` chunks in flight, and results are written in input order, so
memory does not grow with the text (only with the index: Megatron's builders keep
their lists of lengths, ~100 bytes per example).
Atomic: everything is written into a hidden temporary directory next to
``--out`` and renamed to it at the end; an error, a dead worker, Ctrl-C or
SIGTERM removes the temporary directory, so no partial dataset ever exists at
``--out`` (a SIGKILL of the main process can leave ``.NAME.tmp-PID`` behind).
"""
import json
import os
import shutil
import signal
import sys
from collections import Counter, deque
from pathlib import Path

import numpy as np

from megatron_mole.training import indexed as I
from megatron_mole.training.data import (MAX_REPORTED_BAD_LINES, BadLine, DataError, _BadRecord, effective_chat_template,
                                         parse_line, parse_record, template_refusal, tokenize_messages)

__all__ = ["add_arguments", "run", "preprocess"]

CHUNK = 256  # records per task sent to a worker
_tokenizer = None  # the worker's tokenizer (set by _init_worker)


def add_arguments(parser):
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="JSONL files, or Hugging Face datasets (save_to_disk directory, .parquet, .arrow)")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face tokenizer directory")
    parser.add_argument("--out", required=True, metavar="PREFIX", help="output dataset directory (data.prefix)")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    parser.add_argument("--force", action="store_true", help="replace an existing dataset at --out")


def run(args) -> int:
    try:
        meta = preprocess(args.data, args.tokenizer, args.out, workers=args.workers, force=args.force)
    except (DataError, OSError) as error:
        print(f"megatron-mole preprocess: error: {error}", file=sys.stderr, flush=True)
        return 2
    domains = ", ".join(f"{d}={n}" for d, n in meta["domain_counts"].items())
    print(f"preprocess: {meta['num_lines']} lines -> {meta['num_examples']} examples ({domains}), "
          f"{meta['num_bad_lines']} bad lines, {meta['seconds']:.1f}s with {args.workers} worker(s) -> {args.out}",
          flush=True)
    return 0


# ---------------------------------------------------------------- reading

def _is_hf_dataset(path: Path) -> bool:
    return path.suffix in (".parquet", ".arrow") or (path.is_dir() and (path / "state.json").is_file())


def _hf_rows(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face dataset; reading it needs the `datasets` package "
                        f"(pip install 'megatron_mole[data]')") from None
    if path.suffix == ".parquet":
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=False)
    elif path.suffix == ".arrow":
        table = datasets.Dataset.from_file(str(path))
    else:
        table = datasets.load_from_disk(str(path))
        if isinstance(table, datasets.DatasetDict):
            raise DataError(f"{path} holds several splits ({', '.join(table)}); pass one split's directory")
    for start in range(0, len(table), CHUNK):  # batches: Arrow -> Python one chunk at a time
        batch = table[start:start + CHUNK]
        for i in range(len(next(iter(batch.values()), []))):
            yield {k: v[i] for k, v in batch.items() if v[i] is not None}


def _chunks(paths):
    """(file index, [(line number, raw bytes or record dict), ...]) in input order; blank lines skipped."""
    for file_index, path in enumerate(paths):
        path = Path(path)
        if not path.exists():
            raise DataError(f"--data {path}: no such file or directory")
        if _is_hf_dataset(path):
            yield from _chunked(file_index, enumerate(_hf_rows(path), start=1))
        else:
            with open(path, "rb") as handle:
                yield from _chunked(file_index, ((n, raw) for n, raw in enumerate(handle, start=1) if raw.strip()))


def _chunked(file_index, items):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == CHUNK:
            yield file_index, chunk
            chunk = []
    if chunk:
        yield file_index, chunk


# ---------------------------------------------------------------- tokenising (in the workers)

def _init_worker(tokenizer_dir):
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def encode_chunk(items) -> list:
    """[(line, reason) for a bad record | (line, domain, ids, spans, first_label)] of one chunk."""
    from jinja2 import TemplateError

    out = []
    for number, payload in items:
        try:
            domain, messages = parse_line(payload) if isinstance(payload, bytes) else parse_record(payload)
            ids_L, supervised_L = tokenize_messages(_tokenizer, messages)
        except _BadRecord as error:
            out.append((number, str(error)))
            continue
        except TemplateError as error:
            out.append((number, template_refusal(error)))
            continue
        out.append((number, domain, ids_L, I.spans_of(supervised_L), I.first_label(supervised_L)))
    return out


def _results(chunks, tokenizer_dir, workers: int):
    """Encoded chunks in input order; ``workers`` > 1 forks a pool with a bounded window of tasks."""
    if workers <= 1:
        _init_worker(tokenizer_dir)
        for file_index, chunk in chunks:
            yield file_index, len(chunk), encode_chunk(chunk)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # A killed worker makes ProcessPoolExecutor raise BrokenProcessPool (multiprocessing.Pool would hang).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=_init_worker, initargs=(tokenizer_dir,)) as pool:
        window = deque()
        try:
            for file_index, chunk in chunks:
                window.append((file_index, len(chunk), pool.submit(encode_chunk, chunk)))
                if len(window) >= 2 * workers:
                    file_index, n, future = window.popleft()
                    yield file_index, n, future.result()
            while window:
                file_index, n, future = window.popleft()
                yield file_index, n, future.result()
        except BrokenProcessPool:
            raise DataError("a preprocess worker died (killed, or out of memory?); nothing was written") from None
        finally:
            for *_, future in window:
                future.cancel()


# ---------------------------------------------------------------- writing

class DatasetWriter:
    """Streams encoded examples into the temporary directory."""

    def __init__(self, tmp: Path, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.tmp = tmp
        self.token_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.tokens = IndexedDatasetBuilder(str(tmp / f"{I.TOKENS}.bin"), dtype=self.token_dtype)
        self.spans = IndexedDatasetBuilder(str(tmp / f"{I.SPANS}.bin"), dtype=np.int32)
        self.rows = open(tmp / "examples.raw", "wb")
        self.bad = open(tmp / I.BAD_LINES, "w", encoding="utf-8")
        self.domains = {}  # name -> id, in order of first appearance
        self.counts = Counter()
        self.first_bad, self.num_bad, self.num_lines = [], 0, 0

    def add(self, file_index: int, path: str, results: list, num_lines: int):
        import torch

        self.num_lines += num_lines
        rows = []
        for result in results:
            if len(result) == 2:
                bad = BadLine(path, *result)
                self.bad.write(f"{bad}\n")
                if len(self.first_bad) < MAX_REPORTED_BAD_LINES:
                    self.first_bad.append([bad.path, bad.line, bad.reason])
                self.num_bad += 1
                continue
            number, domain, ids_L, spans, first = result
            domain_id = self.domains.setdefault(domain, len(self.domains))
            self.counts[domain] += 1
            self.tokens.add_item(torch.from_numpy(ids_L))
            self.tokens.end_document()
            self.spans.add_item(torch.from_numpy(spans))
            self.spans.end_document()
            rows.append((domain_id, file_index, number, first))
        if rows:
            self.rows.write(np.array(rows, dtype=I.EXAMPLE_DTYPE).tobytes())

    def finish(self, meta: dict):
        self.tokens.finalize(str(self.tmp / f"{I.TOKENS}.idx"))
        self.spans.finalize(str(self.tmp / f"{I.SPANS}.idx"))
        self.rows.close()
        self.bad.close()
        rows = np.fromfile(self.tmp / "examples.raw", dtype=I.EXAMPLE_DTYPE)
        np.save(self.tmp / I.EXAMPLES, rows)
        os.remove(self.tmp / "examples.raw")
        meta.update(domains=list(self.domains), domain_counts=dict(sorted(self.counts.items())),
                    num_examples=int(len(rows)), num_lines=self.num_lines, num_bad_lines=self.num_bad,
                    first_bad_lines=self.first_bad, token_dtype=np.dtype(self.token_dtype).name)
        (self.tmp / I.META).write_text(json.dumps(meta, indent=1) + "\n")

    def close(self):
        for handle in (self.tokens.data_file, self.spans.data_file, self.rows, self.bad):
            handle.close()


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def preprocess(data, tokenizer_dir, out, workers: int = 1, force: bool = False) -> dict:
    """Write the dataset directory ``out``; returns its metadata (also in ``out/meta.json``)."""
    import time

    from transformers import AutoTokenizer

    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    if out.exists() and not force:
        raise DataError(f"--out {out} already exists; pass --force to replace it")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    paths = [str(p) for p in data]
    meta = {"format": I.FORMAT, "sources": paths, "tokenizer": str(tokenizer_dir),
            "tokenizer_sha256": I.tokenizer_fingerprint(tokenizer_dir),
            "chat_template_sha256": I.sha256_text(effective_chat_template(tokenizer)),
            "pad_token_id": next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
    writer = None
    try:
        writer = DatasetWriter(tmp, len(tokenizer))
        for file_index, num_lines, results in _results(_chunks(paths), str(tokenizer_dir), workers):
            writer.add(file_index, paths[file_index], results, num_lines)
        if not writer.counts:
            raise DataError(f"no usable example in {', '.join(paths)} ({writer.num_bad} bad lines, see "
                            f"the first: {writer.first_bad[:1]})")
        meta["seconds"] = time.perf_counter() - start
        writer.finish(meta)
        _install(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return meta


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _install(tmp: Path, out: Path):
    """Rename the finished directory to ``out`` (replacing an old one only once the new one is complete)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
