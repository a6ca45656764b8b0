"""How a task file stores its masks and its head: the mask codec and the compact head dtype.

Masks are coded by one of `mask_codecs` ("zstd" by default, "packed" when coding would not make
them smaller); the head and the task's normalization tensors may be stored in float16 or
bfloat16 (`head_dtype`, lossy, so only on request) and are widened back to the model's dtype
when loaded. `taskfile` writes and reads the files; `convert` rewrites them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from piggyback.errors import TaskFileError
from piggyback.mask_codecs import DEFAULT_MASK_CODEC, get_mask_codec
from piggyback.packing import unpack_codes

PACKED = "packed"
CODED_FROM = 3  # the first task file version whose masks may be coded otherwise than "packed"
HEAD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPACT_PREFIXES = ("head/", "norm/")  # what --head-dtype stores compactly


def encode_masks(
    packed: Tensor, sizes: list[int], bits: int, codec: str | None
) -> tuple[Tensor, str, dict[str, Any]]:
    """(stored masks, codec name, its params) of packed masks. `codec=None` is the default:
    entropy-coded, unless that is not smaller than packed (tiny models)."""
    codes = unpack_codes(packed.cpu(), sum(sizes), bits)
    name = codec or DEFAULT_MASK_CODEC
    data, params = get_mask_codec(name).encode(codes, sizes, bits)
    if codec is None and data.numel() >= packed.numel():
        return packed.cpu(), PACKED, {}
    return data, name, params


def decode_masks(path: Path, meta: dict[str, Any], data: Tensor, sizes: list[int]) -> Tensor:
    """The packed masks stored in a (checked) file, decoded by its codec."""
    params = meta.get("codec_params") or {}
    if not isinstance(params, dict):
        raise TaskFileError(f"{path}: 'codec_params' must be a JSON object, found {params!r}")
    bits = meta.get("bits_per_weight")
    if type(bits) is not int or bits < 1:
        raise TaskFileError(f"{path}: 'bits_per_weight' missing or malformed ({bits!r})")
    try:
        return get_mask_codec(meta.get("codec", PACKED)).decode(data, params, sizes, bits)
    except TaskFileError as error:
        raise TaskFileError(f"{path}: {error}") from error
    except ValueError as error:  # bits the packing does not support
        raise TaskFileError(f"{path}: {error}") from error


def compact(tensors: dict[str, Tensor], head_dtype: str | None) -> dict[str, Tensor]:
    """The floating head and norm tensors in `head_dtype` (all tensors as they are if None)."""
    if head_dtype is None:
        return tensors
    dtype = head_dtype_of(head_dtype)
    return {
        k: v.to(dtype) if k.startswith(COMPACT_PREFIXES) and v.is_floating_point() else v
        for k, v in tensors.items()
    }


def head_dtype_of(name: str) -> torch.dtype:
    if not isinstance(name, str) or name not in HEAD_DTYPES:
        raise ValueError(f"head dtype must be one of {list(HEAD_DTYPES)}, got {name!r}")
    return HEAD_DTYPES[name]


def stored_as(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """(codec, head dtype) a checked task file chose, to save its task the same way again; None
    where it made no choice (versions before `CODED_FROM` could only pack)."""
    chosen = meta["format_version"] >= CODED_FROM
    return (meta.get("codec") if chosen else None), meta.get("head_dtype")


def widened(path: Path, meta: dict[str, Any], found: dict[str, Tensor], expected: dict) -> dict:
    """Compactly stored floating tensors (`head_dtype`) in the dtype the model expects, after
    checking that they were stored in the dtype the file says."""
    head_dtype = meta.get("head_dtype")
    if head_dtype is None:
        return found
    dtype = HEAD_DTYPES[head_dtype]
    out = {}
    for name, tensor in found.items():
        want = expected.get(name)
        if tensor.is_floating_point() and want is not None and want.is_floating_point():
            if tensor.dtype != dtype:
                raise TaskFileError(
                    f"{path}: tensor {name!r} is {tensor.dtype}, the file says {head_dtype}"
                )
            tensor = tensor.to(want.dtype)
        out[name] = tensor
    return out
