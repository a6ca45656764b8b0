"""The "zstd" mask codec: gaps between rare codes (`piggyback.mask_gaps`), entropy-coded by zstd.

Why zstd (measured in `benchmarks/mask_codecs.py`, see the README): the hi part of the gaps is
one byte per rare code, which zstd codes with a Huffman table of the task's own gap distribution.
On learned masks that is within about 1-2% of the order-0 entropy bound, and below it when the
gaps are not geometric (their rare codes cluster, as learned masks' do), since the table is
empirical. zstd decodes those bytes at memory speed, so decoding costs about one numpy pass per
rare code. An exact arithmetic coder (constriction's ANS with a per-tensor geometric model) came
within 0.1-1% of the bound, but its one entropy-coder call per rare code made loading a
ResNet-50 task several times slower than loading its packed file.

Layout (integers little-endian, varint = unsigned LEB128):
    crc32 of what follows (4 bytes) | varint header size | header |
    for each depth with rare codes (the number of codes used - 1): varint frame size, frame |
    for each such depth: its low bits
A depth's frame is one zstd frame (with its content size) of the hi bytes of its levels, in
tensor order; a byte 255 means "255 more" and the value continues in the next byte (empty when
no level of that depth has rare codes). Its low bits are one little-endian bit stream of the k
low bits of each gap, in the same order.
"""

from __future__ import annotations

import zlib

import numpy as np
import zstandard
from torch import Tensor

from piggyback.errors import TaskFileError
from piggyback.mask_gaps import (
    CORRUPT,
    Level,
    Numbers,
    alphabet_size,
    header_numbers,
    low_bytes,
    max_hi_symbols,
    pack_low,
    positions,
    rare_levels,
    read_levels,
    read_varint,
    rebuild,
    split_levels,
    strip_escapes,
    varint,
)

ESCAPE = 255
LEVEL = 19  # compression level: slower writing, smaller files; reading speed does not change


def hi_bytes(gaps: np.ndarray, shift: int) -> bytes:
    """hi = gap >> shift as bytes, each 255 standing for 255 more."""
    hi = gaps >> shift
    lengths = hi // ESCAPE + 1
    out = np.full(int(lengths.sum()), ESCAPE, dtype=np.uint8)
    out[np.cumsum(lengths) - 1] = hi % ESCAPE
    return out.tobytes()


def encode_zstd(codes: np.ndarray, sizes: list[int], bits: int) -> bytes:
    """The "zstd" bytes of flat uint8 `codes` (already checked against `sizes` and `bits`)."""
    alphabet = alphabet_size(codes)
    header = bytearray(varint(alphabet))
    streams = max(0, alphabet - 1)
    hi: list[list[bytes]] = [[] for _ in range(streams)]
    gaps: list[list[np.ndarray]] = [[] for _ in range(streams)]
    shifts: list[list[int]] = [[] for _ in range(streams)]
    for level, level_gaps in split_levels(codes, sizes, alphabet):
        header += header_numbers(level, bits)
        if level.count:
            hi[level.depth].append(hi_bytes(level_gaps, level.shift))
            gaps[level.depth].append(level_gaps)
            shifts[level.depth].append(level.shift)
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=False, write_dict_id=False)
    frames = [compressor.compress(b"".join(parts)) if parts else b"" for parts in hi]
    body = varint(len(header)) + header + b"".join(varint(len(frame)) + frame for frame in frames)
    body += b"".join(pack_low(g, k) for g, k in zip(gaps, shifts, strict=True))
    return zlib.crc32(body).to_bytes(4, "little") + body


def read_hi(frame: bytes, count: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """`strip_escapes` of the hi bytes of a frame holding `count` values, refusing a frame that
    would hold more than `limit` bytes."""
    try:
        size = zstandard.frame_content_size(frame)
        if not count <= size <= limit:
            raise TaskFileError(f"{CORRUPT}: {size} hi bytes where {count}..{limit} fit")
        raw = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise TaskFileError(f"{CORRUPT}: {error}") from error
    return strip_escapes(np.frombuffer(raw, dtype=np.uint8), count, ESCAPE)


class Sections:
    """Reads the byte sections of coded masks in order, after checking the checksum."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 4 or zlib.crc32(data[4:]) != int.from_bytes(data[:4], "little"):
            raise TaskFileError("coded masks are corrupted or truncated (checksum mismatch)")
        self.data, self.pos = data, 4

    def number(self) -> int:
        value, self.pos = read_varint(self.data, self.pos)
        return value

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.pos:
            raise TaskFileError(f"coded masks are truncated ({what} ends early)")
        self.pos += size
        return self.data[self.pos - size : self.pos]

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise TaskFileError(f"{CORRUPT}: data left over after decoding")


def depth_positions(levels: list[Level], frame: bytes, low: bytes) -> np.ndarray:
    """Where the rare codes of one depth's levels are (see `mask_gaps.positions`)."""
    if not levels:
        if frame:
            raise TaskFileError(f"{CORRUPT}: a zstd frame where no level needs one")
        return np.zeros(0, dtype=np.int64)
    count = sum(level.count for level in levels)
    hi, escaped = read_hi(frame, count, max_hi_symbols(levels, ESCAPE))
    return positions(levels, hi, escaped, ESCAPE, low)


def decode_zstd(data: bytes, sizes: list[int], bits: int) -> Tensor:
    """Packed codes (`pack_codes` layout) from "zstd" bytes; `TaskFileError` on bad data."""
    sections = Sections(data)
    depths = read_levels(Numbers(sections.take(sections.number(), "header")), sizes, bits)
    coded = [rare_levels(levels) for levels in depths[:-1]]
    frames = [sections.take(sections.number(), "zstd frame") for _ in coded]
    lows = [sections.take(low_bytes(levels), "low bits") for levels in coded]
    sections.finish()
    rare = [depth_positions(*args) for args in zip(coded, frames, lows, strict=True)]
    return rebuild(depths, [*rare, np.zeros(0, dtype=np.int64)], sizes, bits)
