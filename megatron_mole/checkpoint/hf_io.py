"""Hugging Face checkpoint files: lazy, validated reading and sharded writing.

:class:`HFCheckpoint` opens every safetensors shard once (``safe_open`` maps the file;
a tensor is read only when asked for), checks up front that the index and the shards
agree, and reports a missing or truncated shard by file name before anything is
converted. Shapes and dtypes come from the headers, so a whole checkpoint is validated
without reading its data.

:func:`write_shards` writes one file at a time, so exporting holds at most one shard of
Hugging Face tensors beyond the model being exported.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable, Dict, Iterable, List, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "HFCheckpoint",
    "INDEX_NAME",
    "SINGLE_NAME",
    "copy_side_files",
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


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, damaged or not what the model needs."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16); got {name!r}")
    return dtype


class HFCheckpoint(contextlib.AbstractContextManager):
    """The safetensors weights of a Hugging Face model directory, opened lazily."""

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
        self._stack = contextlib.ExitStack()
        self._handles = {}
        self._keys = {}
        self.file_metadata = {}
        try:
            for name in files:
                self._open(name)
        except BaseException:
            self._stack.close()
            raise
        if self.weight_map is None:
            self.weight_map = {k: SINGLE_NAME for k in self._handles[SINGLE_NAME].keys()}
        for key, name in self.weight_map.items():
            if key not in self._keys[name]:
                raise CheckpointError(f"tensor {key!r} is listed in {INDEX_NAME} under {name} but {name} lacks it")

    def _open(self, name):
        path = os.path.join(self.directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"shard {name} listed in {INDEX_NAME} is missing from {self.directory}")
        self._check_extent(path)
        try:
            handle = self._stack.enter_context(safe_open(path, framework="pt"))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"shard {path} cannot be read: {err}") from err
        self._handles[name] = handle
        self._keys[name] = set(handle.keys())
        self.file_metadata[name] = handle.metadata()

    @staticmethod
    def _check_extent(path):
        # A file cut short after its header would only fail when a tensor is read;
        # compare the extent its header describes with the file size instead.
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if 8 + header_len > size:
                    raise ValueError(f"header of {header_len} bytes exceeds the file")
                header = json.loads(f.read(header_len))
            data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"shard {path} is truncated or not a safetensors file ({err})") from err
        if 8 + header_len + data_end > size:
            raise CheckpointError(
                f"shard {path} is truncated: its header describes {8 + header_len + data_end} bytes, "
                f"the file has {size}"
            )

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def close(self):
        self._stack.close()

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, key: str) -> str:
        return self.weight_map[key]

    def _handle(self, key):
        if key not in self.weight_map:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.directory}")
        return self._handles[self.weight_map[key]]

    def shape(self, key: str) -> List[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        code = self._handle(key).get_slice(key).get_dtype()
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
        if code not in names:
            raise CheckpointError(f"tensor {key!r} in {self.file_of(key)} has unsupported dtype {code}")
        return names[code]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)


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


def write_shards(
    out_dir: str,
    files: Dict[str, Sequence[str]],
    produce: Callable[[Iterable[str]], Dict[str, torch.Tensor]],
    file_metadata: Dict[str, dict] = None,
    index_metadata: dict = None,
    write_index: bool = True,
) -> None:
    """Write ``files`` (file name -> tensor names) one file at a time.

    ``produce(names)`` returns the tensors of one file. The index is written when
    ``write_index`` (the source had one); ``index_metadata`` is kept as it was read.
    """
    weight_map, total = {}, 0
    for name, keys in files.items():
        tensors = produce(keys)
        # Clone: views of one fused Megatron tensor (q, k, v) share storage, which
        # safetensors refuses; the clone also makes them contiguous.
        tensors = {k: tensors[k].detach().clone() for k in keys}
        meta = (file_metadata or {}).get(name) or {"format": "pt"}
        save_file(tensors, os.path.join(out_dir, name), metadata=meta)
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    if write_index:
        metadata = dict(index_metadata) if index_metadata is not None else {"total_size": total}
        with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
            f.write("\n")
