"""Hugging Face checkpoint files: lazy, validated reading and sharded writing.

:class:`HFCheckpoint` parses every safetensors header once (a tensor is read only when
asked for), checks up front that the index and the shards agree, and reports a missing
or truncated shard by file name before anything is converted. Shapes and dtypes come from the headers, so a whole checkpoint is validated
without reading its data.

:func:`write_files` writes one file at a time, so exporting holds at most one shard of
Hugging Face tensors beyond the model being exported; under torchrun each rank writes its
own files and rank 0 the index (:func:`write_index`).

Two ways to read a tensor: :meth:`HFCheckpoint.get` reads its byte range into a new
buffer (one copy); :meth:`HFCheckpoint.view` maps the file and returns a tensor over the
page cache with no copy at all, for conversions whose own op copies anyway (q/k/v and
gate/up fusion: the fused tensor is then the only copy made). Mapped pages count in the
process's RSS while mapped, so a converter :meth:`~HFCheckpoint.release`\ s each range once
converted; :meth:`~HFCheckpoint.prefetch` asks the kernel to start reading the next ranges
from disk while the current ones are converted.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from safetensors.torch import save_file

from megatron_mole.errors import CheckpointError  # the one CheckpointError; re-exported as hf_io.CheckpointError

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "INDEX_NAME",
    "SINGLE_NAME",
    "copy_side_files",
    "write_files",
    "write_index",
    "write_shards",
    "dtype_name",
    "dtype_from_name",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weight files are converted, everything else (config, tokenizer, generation config,
# chat templates, licences) is copied through byte for byte.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = (INDEX_NAME, "pytorch_model.bin.index.json")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16); got {name!r}")
    return dtype


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class HFCheckpoint(contextlib.AbstractContextManager):
    """The safetensors weights of a Hugging Face model directory, read lazily.

    Headers are parsed here. :meth:`get` reads a tensor with a plain file read;
    :meth:`view` maps the file (as ``safe_open`` does, but the caller releases each range
    after use: mapped pages that were read count in the process's RSS until unmapped or
    released, so converting a model would otherwise look, and under memory limits be,
    twice its size).
    """

    def __init__(self, directory: str):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(f"Hugging Face checkpoint directory {directory!r} does not exist")
        index_path = os.path.join(directory, INDEX_NAME)
        self.index_metadata = None
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
                self.weight_map: Dict[str, str] = dict(index["weight_map"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({err})") from err
            self.index_metadata = index.get("metadata")
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            self.weight_map = None
        else:
            others = [n for n in sorted(os.listdir(directory)) if n.endswith(_WEIGHT_SUFFIXES)]
            raise CheckpointError(
                f"{directory}: neither {SINGLE_NAME} nor {INDEX_NAME} found"
                + (f" (found {others}; only safetensors checkpoints are read)" if others else "")
            )
        files = [SINGLE_NAME] if self.weight_map is None else sorted(set(self.weight_map.values()))
        self._entries = {}  # file -> {key: header entry}
        self._maps = {}  # file -> (mmap, uint8 tensor over the whole file), made by view()
        self._data_start = {}
        self.file_metadata = {}
        for name in files:
            self._read_header(name)
        if self.weight_map is None:
            self.weight_map = {k: SINGLE_NAME for k in self._entries[SINGLE_NAME]}
        for key, name in self.weight_map.items():
            if key not in self._entries[name]:
                raise CheckpointError(f"tensor {key!r} is listed in {INDEX_NAME} under {name} but {name} lacks it")

    def _read_header(self, name):
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"shard {name} listed in {INDEX_NAME} is missing from {self.directory}")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if 8 + header_len > size:
                    raise ValueError(f"its header of {header_len} bytes exceeds the file")
                header = json.loads(f.read(header_len))
            self.file_metadata[name] = header.pop("__metadata__", None)
            data_end = max((v["data_offsets"][1] for v in header.values()), default=0)
            for key, entry in header.items():
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"tensor {key!r} has unsupported dtype {entry['dtype']}")
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"shard {path} is truncated or not a safetensors file: {err}") from err
        # A file cut short after its header would otherwise fail only when a tensor is read.
        if 8 + header_len + data_end > size:
            raise CheckpointError(
                f"shard {path} is truncated: its header describes {8 + header_len + data_end} bytes, "
                f"the file has {size}"
            )
        self._entries[name] = header
        self._data_start[name] = 8 + header_len

    def __exit__(self, *exc):
        maps, self._maps = self._maps, {}
        for mapped, _ in maps.values():
            try:
                mapped.close()
            except BufferError:
                pass  # a tensor still views it: unmapped when that tensor goes
        return False

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, key: str) -> str:
        return self.weight_map[key]

    def _entry(self, key):
        if key not in self.weight_map:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.directory}")
        return self._entries[self.weight_map[key]][key]

    def shape(self, key: str) -> List[int]:
        return list(self._entry(key)["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self._entry(key)["data_offsets"]
        return end - begin

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._entry(key)["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        entry, name = self._entry(key), self.weight_map[key]
        begin, end = self._range(key)
        buffer = bytearray(end - begin)
        with open(os.path.join(self.directory, name), "rb") as f:
            f.seek(begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"tensor {key!r}: {name} ended before its data")
        if not buffer:
            return torch.empty(entry["shape"], dtype=self.dtype(key))
        # safetensors stores little-endian data, as every platform torch runs on.
        return torch.frombuffer(buffer, dtype=self.dtype(key)).reshape(entry["shape"])

    def _mapped(self, name):
        if name not in self._maps:
            with open(os.path.join(self.directory, name), "rb") as f:
                # ACCESS_COPY: a private, writable mapping (torch wants a writable buffer);
                # nothing writes to it, so its pages stay the page cache's.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[name] = (mapped, torch.frombuffer(mapped, dtype=torch.uint8))
        return self._maps[name]

    def _range(self, key):
        begin, end = self._entry(key)["data_offsets"]
        start = self._data_start[self.weight_map[key]]
        return start + begin, start + end

    def view(self, key: str) -> torch.Tensor:
        """The tensor over the file's mapping: no copy; see :meth:`is_view`, :meth:`release`."""
        entry, name = self._entry(key), self.weight_map[key]
        begin, end = self._range(key)
        dtype = self.dtype(key)
        if end == begin or begin % dtype.itemsize:
            return self.get(key)  # empty, or not aligned for its dtype (files safetensors writes are)
        _, whole = self._mapped(name)
        return whole[begin:end].view(dtype).reshape(entry["shape"])

    def is_view(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` shares memory with one of the file mappings."""
        pointer = tensor.untyped_storage().data_ptr()
        return any(whole.untyped_storage().data_ptr() == pointer for _, whole in self._maps.values())

    def _advise(self, keys, advice):
        page = mmap.PAGESIZE
        for key in keys:
            mapped, _ = self._mapped(self.weight_map[key])
            begin, end = self._range(key)
            start = begin - begin % page  # madvise wants a page-aligned start
            if end > start:
                mapped.madvise(advice, start, end - start)

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the kernel to read these tensors' ranges ahead (asynchronously)."""
        self._advise(keys, mmap.MADV_WILLNEED)

    def release(self, keys: Iterable[str]) -> None:
        """Drop these tensors' mapped pages from this process (the page cache keeps them);
        a later :meth:`view` maps them in again. Views of them must be dead or unused."""
        self._advise(keys, mmap.MADV_DONTNEED)


def copy_side_files(src: str, dst: str) -> List[str]:
    """Copy every non-weight file (config, tokenizer, generation config) from src to dst."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES:
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def _own_storage(tensor: torch.Tensor, storages: set) -> torch.Tensor:
    storage = tensor.untyped_storage()
    whole = tensor.is_contiguous() and tensor.storage_offset() == 0
    if whole and storage.nbytes() == tensor.numel() * tensor.element_size() and storage.data_ptr() not in storages:
        storages.add(storage.data_ptr())
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def write_files(
    out_dir: str,
    files: Dict[str, Sequence[str]],
    produce: Callable[[Iterable[str]], Dict[str, torch.Tensor]],
    file_metadata: Dict[str, dict] = None,
) -> Tuple[Dict[str, str], int]:
    """Write ``files`` (file name -> tensor names) one file at a time; ``produce(names)``
    returns the tensors of one file. Returns the weight map written and its total bytes."""
    weight_map, total = {}, 0
    for name, keys in files.items():
        produced = produce(keys)
        # Tensors sharing storage (q, k, v of one fused Megatron tensor; a tied head and
        # its embedding) are refused by safetensors: copy those, leave the others alone.
        tensors, storages = {}, set()
        for k in keys:
            tensors[k] = _own_storage(produced[k].detach(), storages)
        del produced
        meta = (file_metadata or {}).get(name) or {"format": "pt"}
        save_file(tensors, os.path.join(out_dir, name), metadata=meta)
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    return weight_map, total


def write_index(out_dir: str, weight_map: Dict[str, str], total: int, index_metadata: dict = None) -> None:
    """The safetensors index; ``index_metadata`` is kept as it was read (else the total size)."""
    metadata = dict(index_metadata) if index_metadata is not None else {"total_size": total}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")


def write_shards(
    out_dir: str,
    files: Dict[str, Sequence[str]],
    produce: Callable[[Iterable[str]], Dict[str, torch.Tensor]],
    file_metadata: Dict[str, dict] = None,
    index_metadata: dict = None,
    write_index_file: bool = True,
) -> None:
    """:func:`write_files`, then the index when ``write_index_file`` (the source had one)."""
    weight_map, total = write_files(out_dir, files, produce, file_metadata)
    if write_index_file:
        write_index(out_dir, weight_map, total, index_metadata)
