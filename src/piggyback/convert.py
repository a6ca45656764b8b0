"""Rewriting a model directory's task files with another mask codec or head dtype.

Nothing is built: each task file is read (checked), its masks decoded with the layer list it
records, re-encoded, its head and norms cast, and written to a temporary file next to it. That
file is then read back and compared with what was meant (masks exactly, every other tensor
exactly as cast) before it replaces the old one, so a failed conversion leaves the old file as it
was. The index does not change: the codec and head dtype are recorded in each task file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

import piggyback
from piggyback.errors import TaskFileError
from piggyback.fileio import META_KEY, atomic_path, content_checksum
from piggyback.model_dir import index_lock, indexed_task_path, read_model_config
from piggyback.task_coding import HEAD_DTYPES, decode_masks, encode_masks, head_dtype_of
from piggyback.taskfile import TASK_FORMAT_VERSION, read_task_file

__all__ = ["convert_model_dir", "convert_task_file"]


def convert_model_dir(
    directory: str | Path, codec: str | None = None, head_dtype: str | None = None
) -> dict[str, dict[str, Any]]:
    """Convert every task file of a model directory (see `convert_task_file`); per task, what
    changed. Each file is replaced only once its conversion is verified."""
    directory = Path(directory)
    with index_lock(directory):  # no task is saved into the directory meanwhile
        index = read_model_config(directory)
        return {
            name: convert_task_file(indexed_task_path(directory, name, entry), codec, head_dtype)
            for name, entry in index["tasks"].items()
        }


def convert_task_file(
    path: Path, codec: str | None = None, head_dtype: str | None = None
) -> dict[str, Any]:
    """Rewrite one task file: masks coded by `codec` (None: the default codec), head and norms
    in `head_dtype` (None: as they are). Returns the sizes and settings before and after."""
    if head_dtype is not None:
        head_dtype_of(head_dtype)  # refuse unknown names before touching anything
    meta, tensors = read_task_file(path)
    sizes = [math.prod(shape) for _, shape in meta["layers"]]
    new_tensors, coding = dict(tensors), {"codec": "packed", "codec_params": {}}
    packed = None
    if "masks" in tensors:
        packed = decode_masks(path, meta, tensors["masks"], sizes)
        bits = int(meta["bits_per_weight"])
        new_tensors["masks"], name, params = encode_masks(packed, sizes, bits, codec)
        coding = {"codec": name, "codec_params": params}
    dtype = head_dtype or meta.get("head_dtype")
    new_tensors = {k: _cast(k, v, dtype) for k, v in new_tensors.items()}
    new_meta = {
        **meta,
        "format_version": TASK_FORMAT_VERSION,
        "piggyback_version": piggyback.__version__,
        **coding,
        "head_dtype": None if dtype == "float32" else dtype,
    }
    new_meta["checksum"] = content_checksum(new_meta, new_tensors)
    before = path.stat().st_size
    with atomic_path(path) as tmp:
        save_file(new_tensors, str(tmp), metadata={META_KEY: json.dumps(new_meta)})
        _verify(tmp, new_meta, new_tensors, packed, sizes)
    return {
        "file": str(path),
        "bytes_before": before,
        "bytes_after": path.stat().st_size,
        "codec_before": meta.get("codec", "packed"),
        "codec_after": coding["codec"],
        "head_dtype_before": meta.get("head_dtype") or "float32",
        "head_dtype_after": dtype or "float32",
    }


def _cast(key: str, tensor: Tensor, dtype: str | None) -> Tensor:
    compact = key.startswith(("head/", "norm/")) and tensor.is_floating_point()
    if not compact or dtype is None:
        return tensor
    return tensor.to(HEAD_DTYPES[dtype]).contiguous()


def _verify(
    path: Path,
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    packed: Tensor | None,
    sizes: list[int],
) -> None:
    """The written file reads back as meant: same metadata and tensors, same masks decoded."""
    found_meta, found = read_task_file(path)
    same = found_meta == meta and found.keys() == tensors.keys()
    same = same and all(
        found[k].dtype == v.dtype and torch.equal(found[k], v) for k, v in tensors.items()
    )
    if same and packed is not None:
        same = torch.equal(decode_masks(path, found_meta, found["masks"], sizes), packed.cpu())
    if not same:
        raise TaskFileError(f"{path}: the converted file does not read back as written; kept")
