"""`megatron-mole preprocess` and the memory-mapped training path (data.prefix).

The JSONL path (``InstructionDataset``) is the reference: the same files, preprocessed
with one or two workers (several chunks each), or as one prefix per file, or saved as
Hugging Face datasets, must give the same examples per domain (ids, assistant mask,
source), the same report and the same training rows (tokens, labels, loss masks,
position and segment ids), packed and not. Identical losses of a whole `train` run on
both paths are checked in tests/test_train.py (one launch with its other jobs).
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_mole.training import data as D
from megatron_mole.training import preprocess as P
from megatron_mole.training.indexed import IndexedInstructionDataset
from megatron_mole.training.sampler import GlobalBatchLoader
from megatron_mole.training.synthetic import generate_records
from tests.test_data import _tokenizer_dir

S = 24
LONG = [json.dumps({"domain": "arithmetic", "prompt": "hi", "response": "red cat runs " * 20}),  # truncated
        json.dumps({"domain": "reverse", "prompt": " ".join(["red cat"] * 40), "response": "ok"}),  # dropped
        "{not json", "", json.dumps({"domain": "a", "messages": [{"role": "user", "content": "x"}]})]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    tok = _tokenizer_dir(str(tmp_path_factory.mktemp("tok")))
    records = generate_records(24, seed=3)
    lines = [json.dumps(r) for r in records]
    first, second = lines[:50] + LONG[:3], LONG[3:] + lines[50:]
    paths = []
    for name, chunk in (("a.jsonl", first), ("b.jsonl", second)):
        (root / name).write_text("\n".join(chunk) + "\n")
        paths.append(str(root / name))
    return root, tok, paths, records


def _jsonl(tok, paths):
    from transformers import AutoTokenizer

    return D.InstructionDataset.from_jsonl(paths, AutoTokenizer.from_pretrained(tok), S)


def _rows(dataset, packing, batches=3):
    loader = GlobalBatchLoader(dataset, 8, seed=5, packing=packing)
    return [loader.next_global_batch() for _ in range(batches)]


def _assert_same(indexed, reference):
    assert indexed.domains == reference.domains and indexed.domain_sizes() == reference.domain_sizes()
    assert indexed.pad_token_id == reference.pad_token_id
    for ours, theirs in zip(indexed.examples, reference.examples):
        for k, want in enumerate(theirs):
            got = ours[k]
            assert got.source == want.source
            assert got.ids_L.dtype == want.ids_L.dtype and (got.ids_L == want.ids_L).all()
            assert (got.supervised_L == want.supervised_L).all()
    assert indexed.report.summary() == reference.report.summary()
    for packing in (False, True):
        for got, want in zip(_rows(indexed, packing), _rows(reference, packing)):
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (packing, key)


def test_preprocessed_rows_equal_jsonl_rows(files, tmp_path, monkeypatch):
    root, tok, paths, _ = files
    monkeypatch.setattr(P, "CHUNK", 16)  # several chunks per file, several in flight
    reference = _jsonl(tok, paths)
    assert reference.report.num_truncated and reference.report.dropped_too_long and reference.report.bad_lines
    for workers in (1, 2):
        meta = P.preprocess(paths, tok, tmp_path / f"w{workers}", workers=workers)
        assert meta["num_bad_lines"] == 2 and meta["num_lines"] == 24 * 4 + 4
        _assert_same(IndexedInstructionDataset(tmp_path / f"w{workers}", tok, S), reference)
    assert (tmp_path / "w1" / "bad_lines.txt").read_text() == "".join(f"{b}\n" for b in reference.report.bad_lines)
    # one prefix per file, listed in the files' order = the JSONL files together
    for i, path in enumerate(paths):
        P.preprocess([path], tok, tmp_path / f"p{i}")
    _assert_same(IndexedInstructionDataset([tmp_path / "p0", tmp_path / "p1"], tok, S), reference)
    with pytest.raises(D.DataError) as want:
        D.read_jsonl(paths[0], strict=True)
    with pytest.raises(D.DataError, match=r"bad data line .*a\.jsonl:53: invalid JSON .*strict=True") as got:
        IndexedInstructionDataset(tmp_path / "p0", tok, S, strict=True)
    assert str(got.value) == str(want.value)


def test_tokenizer_mismatch_is_refused(files, tmp_path):
    root, tok, paths, _ = files
    P.preprocess(paths[:1], tok, tmp_path / "p")
    other = tmp_path / "tok2"
    shutil.copytree(tok, other)
    IndexedInstructionDataset(tmp_path / "p", other, S)  # a byte-identical copy is the same tokenizer
    (other / "chat_template.jinja").write_text(D.DEFAULT_CHAT_TEMPLATE.replace("<|", "<<|"))
    with pytest.raises(D.DataError, match=rf"tokenised with tokenizer {tok} .*this run's tokenizer {other} differs "
                                          rf"in its tokenizer files and chat template"):
        IndexedInstructionDataset(tmp_path / "p", other, S)


def _die_on_second_chunk(items):
    if items[0][0] > 16:  # a worker killed mid-way
        os.kill(os.getpid(), 9)
    return _encode(items)


_encode = P.encode_chunk


def test_killed_preprocess_leaves_no_partial_output(files, tmp_path, monkeypatch, capsys):
    root, tok, paths, _ = files
    monkeypatch.setattr(P, "CHUNK", 16)
    monkeypatch.setattr(P, "encode_chunk", _die_on_second_chunk)
    with pytest.raises(D.DataError, match="a preprocess worker died"):
        P.preprocess(paths, tok, tmp_path / "out", workers=2)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(P, "encode_chunk", _encode)
    P.preprocess(paths[:1], tok, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []

    def fail_on_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return add(self, *args)

    add = P.DatasetWriter.add
    monkeypatch.setattr(P.DatasetWriter, "add", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):  # replacing with --force: the old one stays whole
        P.preprocess(paths, tok, tmp_path / "out", workers=1, force=True)
    assert os.listdir(tmp_path) == ["out"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    from megatron_mole.cli import main

    assert main(["preprocess", "--data", *paths, "--tokenizer", tok, "--out", str(tmp_path / "out")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_hugging_face_datasets_input(files, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed "
                                                      "(pip install -e .[data])")
    root, tok, _, records = files
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    reference = _jsonl(tok, [str(path)])
    # Arrow columns of both record formats: a row lacks the other format's fields (null)
    keys = ("domain", "messages", "prompt", "response")
    table = datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "all.parquet"))
    for source in ("saved", "all.parquet"):
        P.preprocess([tmp_path / source], tok, tmp_path / f"out-{source}")
        indexed = IndexedInstructionDataset(tmp_path / f"out-{source}", tok, S)
        assert indexed.domain_sizes() == reference.domain_sizes()
        for ours, theirs in zip(indexed.examples, reference.examples):
            for k, want in enumerate(theirs):
                assert (ours[k].ids_L == want.ids_L).all() and (ours[k].supervised_L == want.supervised_L).all()
                assert ours[k].source == f"{tmp_path / source}:{want.source.rsplit(':', 1)[1]}"
