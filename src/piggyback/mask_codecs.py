"""Mask codecs: how a task's mask codes are stored in its file, by name.

In memory a task's masks are one flat uint8 tensor of bit-packed codes (`packing.pack_codes`, 1 or
2 bits per weight, concatenated over the masked tensors in target order). A codec turns those
codes into the bytes a task file stores, and back into that same packed layout, so that a loaded
task costs the same memory whichever codec its file used:

- "packed": the packed codes themselves (format version 1 files; no decoding at all);
- "zstd": lossless entropy coding of the gaps between rare codes (`piggyback.mask_zstd`), close
  to (and on learned masks below) the order-0 entropy of each tensor's mask: about 0.02-0.3 bit
  per weight for learned masks instead of 1.

A file names its codec, so a reader refuses (with `TaskFileError`) only codecs it does not know.
Decoders treat their input as untrusted: garbage raises `TaskFileError`, never anything else.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from piggyback.errors import TaskFileError
from piggyback.mask_zstd import decode_zstd, encode_zstd
from piggyback.packing import SUPPORTED_BITS, pack_codes, packed_size

DEFAULT_MASK_CODEC = "zstd"


class MaskCodec(Protocol):
    """Encodes flat mask codes of known tensor sizes into bytes, and back into packed codes."""

    name: str

    def encode(self, codes: Tensor, sizes: list[int], bits: int) -> tuple[Tensor, dict[str, Any]]:
        """(stored bytes as a flat uint8 tensor, JSON-serialisable parameters) of `codes`."""
        ...

    def decode(self, data: Tensor, params: dict[str, Any], sizes: list[int], bits: int) -> Tensor:
        """The codes as `pack_codes(codes, bits)` gives them; `TaskFileError` on bad data."""
        ...


def check_codes(codes: Tensor, sizes: list[int], bits: int) -> Tensor:
    """`codes` as a flat CPU uint8 tensor, after checking it against `sizes` and `bits`
    (a programming error, not a bad file, so ValueError)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if any(size < 0 for size in sizes):
        raise ValueError(f"tensor sizes must be >= 0, got {sizes}")
    codes = codes.detach().reshape(-1).to("cpu")
    if codes.dtype != torch.uint8 or codes.numel() != sum(sizes):
        raise ValueError(
            f"expected {sum(sizes)} uint8 codes for tensors of sizes {sizes}, "
            f"got {codes.dtype} ({codes.numel()},)"
        )
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < {2**bits} for {bits} bit(s) per code")
    return codes


def check_data(data: Tensor) -> Tensor:
    """Stored mask data must be a flat uint8 tensor (anything else is a malformed file)."""
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        found = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, Tensor) else type(data)
        raise TaskFileError(f"mask data must be a flat uint8 tensor, found {found}")
    return data.to("cpu")


class PackedCodec:
    """The packed codes as they are: 1 bit per weight (binary), 2 bits (ternary)."""

    name = "packed"

    def encode(self, codes: Tensor, sizes: list[int], bits: int) -> tuple[Tensor, dict[str, Any]]:
        return pack_codes(check_codes(codes, sizes, bits), bits), {}

    def decode(self, data: Tensor, params: dict[str, Any], sizes: list[int], bits: int) -> Tensor:
        data = check_data(data)
        expected = packed_size(sum(sizes), bits)
        if data.numel() != expected:
            raise TaskFileError(
                f"packed masks of {sum(sizes)} weights at {bits} bit(s) take {expected} bytes, "
                f"found {data.numel()}"
            )
        return data


class ZstdCodec:
    """Entropy-coded masks (see `piggyback.mask_zstd` for the format and why zstd)."""

    name = "zstd"

    def encode(self, codes: Tensor, sizes: list[int], bits: int) -> tuple[Tensor, dict[str, Any]]:
        data = encode_zstd(check_codes(codes, sizes, bits).numpy(), sizes, bits)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), {}

    def decode(self, data: Tensor, params: dict[str, Any], sizes: list[int], bits: int) -> Tensor:
        return decode_zstd(check_data(data).numpy().tobytes(), sizes, bits)


_CODECS: dict[str, MaskCodec] = {}


def register_mask_codec(codec: MaskCodec) -> MaskCodec:
    """Make `codec` readable and writable under `codec.name` (a name is never reused)."""
    if codec.name in _CODECS:
        raise ValueError(f"a mask codec named {codec.name!r} is already registered")
    _CODECS[codec.name] = codec
    return codec


def get_mask_codec(name: str) -> MaskCodec:
    """The codec called `name` (`TaskFileError`, a ValueError, naming the known ones if none)."""
    codec = _CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise TaskFileError(f"unknown mask codec {name!r}: expected one of {mask_codec_names()}")
    return codec


def mask_codec_names() -> list[str]:
    return sorted(_CODECS)


def entropy_bits(codes: Tensor, sizes: list[int]) -> float:
    """The order-0 entropy bound of masks: the sum over tensors of numel * H(p), p the tensor's
    code frequencies, in bits. What a codec coding each tensor's codes independently can reach;
    "zstd" comes within about 2% of it (less when the masks have structure)."""
    total, start = 0.0, 0
    flat = codes.reshape(-1).numpy()
    for size in sizes:
        counts = np.bincount(flat[start : start + size])
        counts = counts[counts > 0]
        total += float(-(counts * np.log2(counts / size)).sum()) if size else 0.0
        start += size
    return total


register_mask_codec(PackedCodec())
register_mask_codec(ZstdCodec())
