"""Bit-packing small integer codes, 8 / bits of them per byte, little-endian within a byte.

Hand-written rather than numpy.packbits because it must also handle 2-bit ternary codes and run on
the masks' device (unpacking at a task switch on the GPU would otherwise cost a host round trip).
For bits=1 the layout is byte-for-byte that of `numpy.packbits(x, bitorder="little")`.
"""

from __future__ import annotations

import math

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
