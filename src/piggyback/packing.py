"""Bit-packing small integer codes, 8 / bits of them per byte, little-endian within a byte.

Hand-written rather than numpy.packbits because it must also handle 2-bit ternary codes and run on
the masks' device (unpacking at a task switch on the GPU would otherwise cost a host round trip).
For bits=1 the layout is byte-for-byte that of `numpy.packbits(x, bitorder="little")`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 8 // bits


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for `count` codes of `bits` bits: ceil(count * bits / 8)."""
    _check_bits(bits)
    return math.ceil(count * bits / 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack a flat tensor of codes in [0, 2**bits) into a uint8 tensor of `packed_size` bytes."""
    per_byte = _check_bits(bits)
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"codes must be < {2**bits} to pack in {bits} bits")
    padded = F.pad(codes, (0, (-codes.numel()) % per_byte)).view(-1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    # The shifted codes occupy disjoint bits, so their sum is their bitwise OR.
    return (padded << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, count: int, bits: int) -> Tensor:
    """Inverse of `pack_codes`: the first `count` codes as a flat uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed must be a flat uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.numel() != packed_size(count, bits):
        raise ValueError(
            f"{count} codes of {bits} bits need {packed_size(count, bits)} bytes, "
            f"found {packed.numel()}"
        )
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]


def pack_sparse(
    total: int,
    bits: int,
    fills: list[tuple[int, int, int]],
    positions: np.ndarray,
    deltas: np.ndarray,
) -> Tensor:
    """`pack_codes` of `total` codes given as runs plus exceptions, without one byte per code.

    `fills` are (start, stop, code) runs covering [0, total); `positions` (int64, unique) are the
    codes that differ from their run and `deltas` (uint8, one per position or one for all) their
    code minus the run's code, modulo 256; `positions` is overwritten. Decoding an entropy-coded
    mask gives exactly this, and building the packed bytes directly keeps decoding proportional
    to the number of exceptions (a few percent of the weights) plus one fill of the packed bytes.
    """
    per_byte = _check_bits(bits)
    buffer = np.empty(packed_size(total, bits), dtype=np.uint8)  # every byte is written below
    partial: dict[int, int] = {}  # bytes shared by two runs (or padding), filled code by code
    for start, stop, code in fills:
        first_full, last_full = -(-start // per_byte), stop // per_byte
        edges: Iterable[int] = range(start, stop)
        if first_full < last_full:
            buffer[first_full:last_full] = code * (255 // (2**bits - 1))  # the code in every slot
            edges = chain(range(start, first_full * per_byte), range(last_full * per_byte, stop))
        for index in edges:
            byte = index // per_byte
            partial[byte] = partial.get(byte, 0) | code << (index % per_byte * bits)
    if partial:
        buffer[list(partial)] = list(partial.values())
    out = torch.from_numpy(buffer)
    if len(positions):
        # Adding (code - run code) << slot to every byte, modulo 256, gives each slot its code: the
        # exact sum of the slots' final codes lies in 0..255, so no carry ever crosses a slot.
        # per_byte is a power of two, so masks and shifts replace divisions; the work is done in
        # place, as fresh large arrays cost more than the arithmetic.
        slots = positions.astype(np.uint8)
        slots &= per_byte - 1
        if bits > 1:
            slots *= bits
        np.left_shift(deltas, slots, out=slots)
        np.right_shift(positions, per_byte.bit_length() - 1, out=positions)
        out.scatter_add_(0, torch.from_numpy(positions), torch.from_numpy(slots))
    return out
