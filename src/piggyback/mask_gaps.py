"""Masks as gaps between rare codes: the lossless transform under the entropy-coded mask codec.

A learned mask is mostly one code, so it is described by where the other codes are. Per masked
tensor, a level records the most frequent code m and the positions of the codes != m as gaps (how
many m's precede each). With more than two codes (ternary) the codes != m form the sequence of the
next level, one depth down, and so on (the chain rule of entropy: coding each level well codes
the whole well); when one code is left it is implied. A gap g is split into hi = g >> k, which
the entropy coder codes, and its k low bits, stored raw: k is chosen per level so that hi has
about the same distribution in every level (mean about `HI_MEAN`), which lets one entropy model
serve all the levels of one depth of a task (depth 0: which weights are off; depth 1: the sign,
for ternary), each depth a stream of its own.

Decoding is vectorised over the levels of a depth (numpy; no Python loop over weights or rare
codes) and builds the packed masks directly (`packing.pack_sparse`), so its cost grows with the
number of rare codes (a few percent of the weights) rather than with the number of weights.

The header is a list of varints (unsigned LEB128): the number of codes used (largest + 1), then for
each non-empty tensor, for each level (in depth order): m | k << bits, and K (how many codes
differ from m).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from piggyback.errors import TaskFileError
from piggyback.packing import pack_sparse

HI_MEAN = 32  # the encoder scales gaps so that hi = gap >> k averages about this
MAX_SHIFT = 24
CORRUPT = "coded masks are corrupted"


@dataclass
class Level:
    """One level of one tensor: `length` codes, most often `common`, `count` others; its
    sequence starts at `offset` in its depth's sequence (depth 0: the whole masks)."""

    tensor: int
    depth: int
    length: int
    common: int
    count: int
    shift: int = 0
    offset: int = 0


# -- varints ------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of one varint; never longer than 9 bytes (63 bits)."""
    value = 0
    for index in range(9):
        if pos >= len(data):
            raise TaskFileError("coded masks are truncated (a number ends early)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, pos
    raise TaskFileError(f"{CORRUPT}: a number is too long")


class Numbers:
    """The varints of a header, parsed at once (vectorised), then read one by one, each checked
    against a bound: a header is never trusted."""

    def __init__(self, data: bytes) -> None:
        raw = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(raw < 0x80)
        if raw.size and (not ends.size or ends[-1] != raw.size - 1):
            raise TaskFileError("coded masks are truncated (a number ends early)")
        starts = np.concatenate([[0], ends[:-1] + 1]) if ends.size else ends
        lengths = ends - starts + 1
        if lengths.size and lengths.max() > 9:
            raise TaskFileError(f"{CORRUPT}: a number is too long")
        place = np.arange(raw.size) - np.repeat(starts, lengths)
        payload = (raw & 0x7F).astype(np.uint64) << (7 * place).astype(np.uint64)
        self.values = np.add.reduceat(payload, starts).tolist() if raw.size else []
        self.pos = 0

    def next(self, limit: int, what: str) -> int:
        if self.pos >= len(self.values):
            raise TaskFileError("coded masks are truncated (the header ends early)")
        value = self.values[self.pos]
        self.pos += 1
        if value > limit:
            raise TaskFileError(f"{CORRUPT}: {what} {value} > {limit}")
        return value

    def finish(self) -> None:
        if self.pos != len(self.values):
            raise TaskFileError(f"{CORRUPT}: the header is longer than its masks need")


# -- encoding -----------------------------------------------------------------------------------


def alphabet_size(codes: np.ndarray) -> int:
    """How many codes the levels range over (0 .. the largest code used): ternary masks use 3
    of their 2-bit codes, and knowing it spares a level per tensor."""
    return int(codes.max()) + 1 if codes.size else 1


def shift_for(gaps: np.ndarray) -> int:
    """Low bits to store raw so that hi = gap >> k has a mean of about HI_MEAN."""
    mean = float(gaps.mean()) + 1.0
    return min(MAX_SHIFT, max(0, round(math.log2(mean / HI_MEAN))))


def split_levels(
    codes: np.ndarray, sizes: list[int], alphabet: int
) -> Iterator[tuple[Level, np.ndarray]]:
    """Every level of every tensor in header order, with the gaps before its rare codes;
    `Level.shift` is chosen here."""
    offset = 0
    for index, size in enumerate(sizes):
        tensor, offset = codes[offset : offset + size], offset + size
        for depth in range(alphabet - 1):  # with one code left, the rest is implied
            if not tensor.size:
                break
            counts = np.bincount(tensor, minlength=alphabet)
            common = int(counts.argmax())
            rare = tensor != common
            level = Level(index, depth, tensor.size, common, tensor.size - int(counts[common]))
            gaps = np.diff(np.flatnonzero(rare), prepend=-1) - 1
            if level.count:
                level.shift = shift_for(gaps)
            yield level, gaps
            tensor = tensor[rare]


def header_numbers(level: Level, bits: int) -> bytes:
    """A level in the header: its common code and k in one number (one byte for 1-2 bit codes),
    then its count of rare codes."""
    return varint(level.common | level.shift << bits) + varint(level.count)


def pack_low(gaps: list[np.ndarray], shifts: list[int]) -> bytes:
    """The low `shift` bits of every gap, as one little-endian bit stream."""
    rows = [
        (g[:, None] >> np.arange(k)) & 1 for g, k in zip(gaps, shifts, strict=True) if k and g.size
    ]
    if not rows:
        return b""
    bits = np.concatenate([row.astype(np.uint8).reshape(-1) for row in rows])
    return np.packbits(bits, bitorder="little").tobytes()


# -- decoding -----------------------------------------------------------------------------------


def read_levels(numbers: Numbers, sizes: list[int], bits: int) -> list[list[Level]]:
    """The levels of all tensors from the header, by depth (each in tensor order), implied ones
    included, with their offsets."""
    codes = numbers.next(2**bits, "number of codes")
    depths: list[list[Level]] = [[] for _ in range(codes)]
    ends = [0] * codes  # how far each depth's sequence reaches
    start = 0
    for index, size in enumerate(sizes):
        length, left, offset = size, list(range(codes)), start
        start += size
        for depth in range(codes):
            if not length:
                break
            if len(left) == 1:  # the one code left: implied, never has rare codes
                common, count, shift = left[0], 0, 0
            else:
                packed = numbers.next((MAX_SHIFT << bits) | (2**bits - 1), "level")
                common, shift = packed & (2**bits - 1), packed >> bits
                if common not in left:
                    raise TaskFileError(f"{CORRUPT}: code {common} is coded twice or unused")
                count = numbers.next(length - 1, "count of rare codes")
                left.remove(common)
            level = Level(index, depth, length, common, count, shift if count else 0, offset)
            depths[depth].append(level)
            if depth:
                level.offset = ends[depth]
            ends[depth] += length
            length = count
        if size and not codes:
            raise TaskFileError(f"{CORRUPT}: no codes to fill a tensor with")
    numbers.finish()
    return depths


def rare_levels(levels: list[Level]) -> list[Level]:
    return [level for level in levels if level.count]


def low_bytes(levels: list[Level]) -> int:
    return -(-sum(level.count * level.shift for level in levels) // 8)


def max_hi_symbols(levels: list[Level], escape: int) -> int:
    """The most hi symbols the levels can have: one per rare code, plus escapes (each escape
    stands for `escape` more, and the hi values of a level sum to at most length >> k)."""
    return sum(level.count + (level.length >> level.shift) // escape for level in levels)


def strip_escapes(symbols: np.ndarray, count: int, escape: int) -> tuple[np.ndarray, np.ndarray]:
    """(the `count` values without their escapes, the index of the value each escape adds
    `escape` to) of hi symbols where `escape` means "`escape` more, continued in the next one".
    Escapes are rare, so they are handled sparsely: no pass over the values is spent on them."""
    escapes = np.flatnonzero(symbols == escape)
    if len(symbols) - len(escapes) != count or (count and symbols[-1] == escape):
        raise TaskFileError(f"{CORRUPT}: hi symbols do not match the count of rare codes")
    if not len(escapes):
        return symbols, escapes
    # The value after a run of escapes sits, once they are removed, at (escape index - rank).
    return np.delete(symbols, escapes), escapes - np.arange(len(escapes))


def append_low(values: np.ndarray, starts: np.ndarray, shifts: list[int], data: bytes) -> None:
    """values = values << k | (k low bits from `data`), level by level, in place.

    The bit stream is unpacked to one byte per bit once; a level's low values are then its bit
    columns OR-ed together in the narrowest integer type. Shifting by one number per level is
    much cheaper than by an array of per-value shifts (measured: 2-3x), and levels are few."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    at = 0
    for start, count, shift in zip(starts, np.diff([*starts, len(values)]), shifts, strict=True):
        if not shift:
            continue
        columns = bits[at : at + count * shift].reshape(count, shift)
        at += count * shift
        low = columns[:, 0].astype(np.uint8 if shift <= 8 else np.uint32)
        for bit in range(1, shift):
            low |= columns[:, bit].astype(low.dtype) << bit
        segment = values[start : start + count]
        segment <<= shift
        segment |= low


def positions(
    levels: list[Level], hi: np.ndarray, escaped: np.ndarray, escape: int, low: bytes
) -> np.ndarray:
    """Positions of the rare codes of `levels` (one depth's levels with rare codes, in order),
    each level's counted from its offset, from the hi values (one per rare code, below `escape`,
    plus `escape` for each occurrence of its index in `escaped`) and the low bits. Each level's
    positions are checked to lie inside it, so that garbage never indexes outside the masks.

    One cumulative sum serves all levels: the first step of each level is corrected so that the
    running sum restarts at the level's offset (fewer passes over the data than rebasing after)."""
    counts = np.array([level.count for level in levels], dtype=np.int64)
    lengths = np.array([level.length for level in levels], dtype=np.int64)
    shifts = np.array([level.shift for level in levels], dtype=np.int64)
    offsets = np.array([level.offset for level in levels], dtype=np.int64)
    starts = np.cumsum(counts) - counts
    steps = np.add(hi, 1, dtype=np.int64)  # hi < escape <= 255: a gap <= 254 << 24, no overflow
    if len(escaped):  # rare: check those values before they can overflow anything
        np.add.at(steps, escaped, escape)
        level_of = np.searchsorted(starts, escaped, side="right") - 1
        if (steps[escaped] > lengths[level_of] >> shifts[level_of]).any():
            raise TaskFileError(f"{CORRUPT}: a gap is longer than its tensor")
    if shifts.any():  # gap = hi << k | low
        steps -= 1
        append_low(steps, starts, shifts.tolist(), low)
        steps += 1
    spans = np.add.reduceat(steps, starts)  # one past each level's last rare code
    if (spans > lengths).any():
        raise TaskFileError(f"{CORRUPT}: a position lies past its tensor")
    restarts = offsets - 1 - (np.cumsum(spans) - spans)  # what makes each level's sum restart
    steps[starts] += np.diff(restarts, prepend=0)
    return np.cumsum(steps, out=steps)


def rebuild(
    depths: list[list[Level]], rare: list[np.ndarray], sizes: list[int], bits: int
) -> Tensor:
    """Packed codes from the levels (by depth) and where each depth's rare codes are.

    Works up from the deepest level, all tensors at once: a depth's sequence is its levels'
    common codes with the rare positions set to the next depth's sequence (the codes at those
    positions). Depth 1 is kept relative to its parents' common codes, as `pack_sparse` wants."""
    values = np.zeros(0, dtype=np.uint8)
    for depth in range(len(depths) - 1, 0, -1):
        levels = depths[depth]
        if not levels:
            continue
        commons = np.array([level.common for level in levels], dtype=np.uint8)
        if depth == 1:  # relative to the parents' common codes, modulo 256
            parents = np.array([level.common for level in rare_levels(depths[0])], np.uint8)
            commons -= parents
            values = values - np.repeat(parents, [level.count for level in levels])
        if not len(rare[depth]) and (commons == commons[0]).all():
            values = commons[:1]  # binary masks: one code for all rare codes, no array needed
            continue
        sequence = np.repeat(commons, [level.length for level in levels])
        sequence[rare[depth]] = values
        values = sequence
    fills = [(level.offset, level.offset + level.length, level.common) for level in depths[0]]
    return pack_sparse(sum(sizes), bits, fills, rare[0], values)
