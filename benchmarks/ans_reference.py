"""A reference mask coder for the codec benchmark: exact order-0 coding with constriction's ANS.

Same gap transform as piggyback's "zstd" codec (`piggyback.mask_gaps`), but each level's hi values
are coded with an arithmetic (ANS) coder and a geometric model fitted to that level: the gaps of
i.i.d. codes are geometric, so this comes within a fraction of a percent of the order-0 bound.
It is not a codec of piggyback: it decodes one entropy-coder symbol per rare code through
constriction's Python API, which the benchmark shows is too slow for loading large tasks.

Bytes: crc32 | varint sizes of header, model list and ANS words | header | models | ANS words |
low bits (stream 0, then stream 1). The model list holds, per level with rare codes, the ratio
index j (rho = j / 128) and the number of escape symbols.
"""

from __future__ import annotations

import functools
import zlib

import constriction
import numpy as np
from torch import Tensor

from piggyback.mask_gaps import (
    Numbers,
    alphabet_size,
    header_numbers,
    low_bytes,
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

ESCAPE = 15  # hi 0..14 coded as themselves; 15 means "15 more"
STEPS = 128  # the geometric ratio is j / 128
PRECISION = 24  # constriction's fixed-point precision


@functools.cache
def model(index: int):
    """Geometric P(hi) = (1 - rho) rho**hi with escape rho**15, as exact 24-bit weights."""
    ratio, stay, floats = index / STEPS, 1.0, []
    for _ in range(ESCAPE):
        floats.append(stay * (1.0 - ratio))
        stay *= ratio
    floats.append(stay)
    weights = [max(1, int(p * (1 << PRECISION))) for p in floats]
    weights[int(np.argmax(weights))] += (1 << PRECISION) - sum(weights)
    probabilities = np.array(weights, dtype=np.float64) / (1 << PRECISION)
    return constriction.stream.model.Categorical(probabilities, perfect=True), np.log2(
        np.array(weights, dtype=np.float64)
    )


def best_index(hi: np.ndarray) -> int:
    """The ratio index that codes `hi` smallest, around the maximum-likelihood one."""
    mean = float(hi.mean())
    center = min(STEPS - 1, max(1, round(STEPS * mean / (1 + mean))))

    def bits(index: int) -> float:
        log_weights = model(index)[1]
        counts = np.bincount(hi % ESCAPE, minlength=ESCAPE)
        escapes = int((hi // ESCAPE).sum())
        return float(counts @ (PRECISION - log_weights[:ESCAPE])) + escapes * (
            PRECISION - log_weights[ESCAPE]
        )

    return min(range(max(1, center - 1), min(STEPS - 1, center + 1) + 1), key=bits)


def symbols(hi: np.ndarray) -> np.ndarray:
    lengths = hi // ESCAPE + 1
    out = np.full(int(lengths.sum()), ESCAPE, dtype=np.int32)
    out[np.cumsum(lengths) - 1] = hi % ESCAPE
    return out


def encode(codes: np.ndarray, sizes: list[int], bits: int) -> bytes:
    alphabet = alphabet_size(codes)
    header, models = bytearray(varint(alphabet)), bytearray()
    streams = max(0, alphabet - 1)
    levels: list[list[tuple[np.ndarray, int, int]]] = [[] for _ in range(streams)]
    gaps: list[list[np.ndarray]] = [[] for _ in range(streams)]
    shifts: list[list[int]] = [[] for _ in range(streams)]
    for level, level_gaps in split_levels(codes, sizes, alphabet):
        header += header_numbers(level, bits)
        if level.count:
            hi = level_gaps >> level.shift
            levels[level.depth].append((symbols(hi), best_index(hi), level.count))
            gaps[level.depth].append(level_gaps)
            shifts[level.depth].append(level.shift)
    order = [entry for depth in levels for entry in depth]  # as decoded: depth by depth
    for coded, index, count in order:
        models += varint(index) + varint(len(coded) - count)
    coder = constriction.stream.stack.AnsCoder()
    for coded, index, _ in reversed(order):  # a stack: what is decoded first is pushed last
        coder.encode_reverse(coded, model(index)[0])
    words = coder.get_compressed().astype("<u4").tobytes()
    lows = b"".join(pack_low(g, k) for g, k in zip(gaps, shifts, strict=True))
    body = varint(len(header)) + varint(len(models)) + varint(len(words) // 4)
    body += header + models + words + lows
    return zlib.crc32(body).to_bytes(4, "little") + body


def decode(data: bytes, sizes: list[int], bits: int) -> Tensor:
    """Packed codes; trusts its input (a benchmark reference, not a file format)."""
    assert zlib.crc32(data[4:]) == int.from_bytes(data[:4], "little")
    pos, lengths = 4, []
    for _ in range(3):
        value, pos = read_varint(data, pos)
        lengths.append(value)
    header, pos = data[pos : pos + lengths[0]], pos + lengths[0]
    models, pos = Numbers(data[pos : pos + lengths[1]]), pos + lengths[1]
    words, pos = np.frombuffer(data[pos : pos + 4 * lengths[2]], "<u4"), pos + 4 * lengths[2]
    coder = constriction.stream.stack.AnsCoder(words.astype(np.uint32))
    depths = read_levels(Numbers(header), sizes, bits)
    rare = []
    for levels in [rare_levels(depth) for depth in depths[:-1]]:
        parts = []
        for level in levels:
            index, escapes = models.next(STEPS, "model"), models.next(1 << 62, "escapes")
            parts.append(coder.decode(model(index)[0], level.count + escapes))
        count = sum(level.count for level in levels)
        joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        hi, escaped = strip_escapes(joined, count, ESCAPE)
        low, pos = data[pos : pos + low_bytes(levels)], pos + low_bytes(levels)
        found = positions(levels, hi, escaped, ESCAPE, low) if levels else np.zeros(0, np.int64)
        rare.append(found)
    return rebuild(depths, [*rare, np.zeros(0, dtype=np.int64)], sizes, bits)
