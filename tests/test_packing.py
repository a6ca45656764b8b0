"""Bit-packing: exact sizes and round trips for every length (property tests)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from piggyback.packing import pack_codes, pack_sparse, packed_size, unpack_codes


@given(st.lists(st.integers(0, 1), max_size=300))
def test_binary_pack_matches_numpy_packbits(bits_list):
    codes = torch.tensor(bits_list, dtype=torch.uint8)
    packed = pack_codes(codes, 1)
    expected = np.packbits(np.array(bits_list, dtype=np.uint8), bitorder="little")
    assert packed.numpy().tobytes() == expected.tobytes()


@settings(max_examples=200)
@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_round_trip_every_length(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(len(values), bits) == math.ceil(len(values) * bits / 8)
    assert torch.equal(unpack_codes(packed, len(values), bits), codes)


def test_binary_is_one_bit_per_weight():
    assert packed_size(8_000_001, 1) == 1_000_001
    assert packed_size(10, 2) == 3


def test_refuses_codes_too_large_and_wrong_sizes():
    with pytest.raises(ValueError, match="< 2"):
        pack_codes(torch.tensor([2], dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 9, 1)
    with pytest.raises(ValueError, match="bits must be"):
        packed_size(4, 3)


@settings(max_examples=150)
@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_sparse_packing_equals_packing_every_code(bits, data):
    """Runs of one code plus exceptions pack exactly like the codes written out one by one."""
    lengths = data.draw(st.lists(st.integers(0, 40), max_size=6))
    fills, codes, start = [], [], 0
    for length in lengths:
        code = data.draw(st.integers(0, 2**bits - 1))
        fills.append((start, start + length, code))
        codes += [code] * length
        start += length
    positions = sorted(data.draw(st.sets(st.integers(0, max(0, start - 1)), max_size=start)))
    values = [data.draw(st.integers(0, 2**bits - 1)) for _ in positions]
    runs = np.array(codes, dtype=np.uint8)
    deltas = (np.array(values, dtype=np.int64) - runs[positions]) % 256
    for position, value in zip(positions, values, strict=True):
        codes[position] = value
    packed = pack_sparse(
        start, bits, fills, np.array(positions, dtype=np.int64), deltas.astype(np.uint8)
    )
    assert torch.equal(packed, pack_codes(torch.tensor(codes, dtype=torch.uint8), bits))
