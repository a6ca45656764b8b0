"""Mask codecs: exact round trips for every kind of mask, compact files, and garbage refused."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piggyback.errors import TaskFileError
from piggyback.mask_codecs import (
    DEFAULT_MASK_CODEC,
    PackedCodec,
    get_mask_codec,
    mask_codec_names,
    register_mask_codec,
)
from piggyback.packing import pack_codes, packed_size

CODECS = mask_codec_names()


def random_codes(sizes: list[int], density: float, alphabet: int, seed: int) -> torch.Tensor:
    """Codes that are 1 ("kept") with probability `density`, else another code < `alphabet`."""
    rng = np.random.default_rng(seed)
    total = sum(sizes)
    codes = np.where(rng.random(total) < density, 1, rng.integers(0, alphabet, total))
    return torch.from_numpy(codes.astype(np.uint8))


def round_trip(name: str, codes: torch.Tensor, sizes: list[int], bits: int) -> torch.Tensor:
    codec = get_mask_codec(name)
    data, params = codec.encode(codes, sizes, bits)
    assert data.dtype == torch.uint8 and data.dim() == 1
    return codec.decode(data, params, sizes, bits)


def entropy_bound_bytes(codes: torch.Tensor, sizes: list[int]) -> float:
    """Sum over tensors of numel * H(p) / 8, p the tensor's code frequencies (order 0)."""
    total, start = 0.0, 0
    for size in sizes:
        counts = np.bincount(codes[start : start + size].numpy())
        counts = counts[counts > 0]
        total += float(-(counts * np.log2(counts / size)).sum()) / 8
        start += size
    return total


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 700), max_size=6),
    density=st.floats(0, 1),
    kind=st.sampled_from([(1, 2), (2, 3), (2, 4), (4, 16), (8, 256)]),  # (bits, codes used)
    seed=st.integers(0, 2**32 - 1),
    name=st.sampled_from(CODECS),
)
def test_every_codec_decodes_exactly_the_packed_codes(sizes, density, kind, seed, name):
    bits, alphabet = kind
    codes = random_codes(sizes, density, alphabet, seed)
    decoded = round_trip(name, codes, sizes, bits)
    assert decoded.dtype == torch.uint8
    assert decoded.numel() == packed_size(sum(sizes), bits)
    assert torch.equal(decoded, pack_codes(codes, bits))


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("fill", [0, 1])
def test_all_on_and_all_off_masks_round_trip(name, bits, fill):
    sizes = [9, 0, 64, 1, 1000]
    codes = torch.full((sum(sizes),), fill, dtype=torch.uint8)
    assert torch.equal(round_trip(name, codes, sizes, bits), pack_codes(codes, bits))


@pytest.mark.parametrize("name", CODECS)
def test_no_tensors_and_only_empty_tensors_round_trip(name):
    for sizes in ([], [0, 0, 0]):
        codes = torch.zeros(0, dtype=torch.uint8)
        assert round_trip(name, codes, sizes, 1).numel() == 0


@pytest.mark.parametrize("name", CODECS)
def test_clustered_masks_with_long_gaps_round_trip(name):
    """Whole rows switched off, and rare codes far apart (gaps far beyond one hi byte)."""
    sizes = [200_000, 3, 50_000]
    codes = np.ones(sum(sizes), dtype=np.uint8)
    codes[[0, 199_999, 200_001, 250_002]] = 0
    codes[1000:3000] = 0  # a run of rare codes
    codes[210_000:210_500] = 2  # ternary signs in another tensor
    codes = torch.from_numpy(codes)
    for bits in (2, 4):
        assert torch.equal(round_trip(name, codes, sizes, bits), pack_codes(codes, bits))


@pytest.mark.parametrize("density", [0.96, 0.99, 0.996])
@pytest.mark.parametrize("alphabet", [2, 3])
def test_default_codec_stays_within_two_percent_of_the_entropy_bound(density, alphabet):
    """Learned-like masks (i.i.d. at the benchmark tasks' densities, 50 tensors): at most
    1.02 x the order-0 bound + 8 bytes per tensor, far below 1 bit per weight."""
    sizes = [int(s) for s in np.random.default_rng(0).integers(2_000, 120_000, 50)]
    codes = random_codes(sizes, density, alphabet, seed=1)
    data, _ = get_mask_codec(DEFAULT_MASK_CODEC).encode(codes, sizes, math.ceil(alphabet / 2))
    bound = entropy_bound_bytes(codes, sizes)
    assert data.numel() <= 1.02 * bound + 8 * len(sizes)
    assert 8 * data.numel() / sum(sizes) < 0.35


def test_encoding_is_deterministic():
    sizes = [5000, 7000]
    codes = random_codes(sizes, 0.97, 3, seed=2)
    codec = get_mask_codec(DEFAULT_MASK_CODEC)
    assert torch.equal(codec.encode(codes, sizes, 2)[0], codec.encode(codes, sizes, 2)[0])


# -- refusing bad data ---------------------------------------------------------------------------


def coded_sample(bits: int = 2) -> tuple[bytes, list[int]]:
    sizes = [3000, 0, 17, 20_000]
    codes = random_codes(sizes, 0.98, 3 if bits == 2 else 2, seed=3)
    data, _ = get_mask_codec(DEFAULT_MASK_CODEC).encode(codes, sizes, bits)
    return data.numpy().tobytes(), sizes


def decode_bytes(data: bytes, sizes: list[int], bits: int) -> torch.Tensor:
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0)
    return get_mask_codec(DEFAULT_MASK_CODEC).decode(tensor.to(torch.uint8), {}, sizes, bits)


def test_every_truncation_is_refused():
    data, sizes = coded_sample()
    for length in range(len(data)):
        with pytest.raises(TaskFileError, match=r"truncated|corrupted"):
            decode_bytes(data[:length], sizes, 2)


def test_every_flipped_bit_is_refused():
    data, sizes = coded_sample(bits=1)
    for index in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[index] ^= 1 << bit
            with pytest.raises(TaskFileError, match="corrupted"):
                decode_bytes(bytes(damaged), sizes, 1)


def with_checksum(body: bytes) -> bytes:
    return zlib.crc32(body).to_bytes(4, "little") + body


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_garbage_behind_a_valid_checksum_raises_task_file_error_or_decodes_to_the_right_size(
    data,
):
    """The decoder's own checks, past the checksum: any bytes either decode to masks of the
    right size or are refused with TaskFileError, never another exception (or a hang)."""
    sample, sizes = coded_sample()
    body = bytearray(sample[4:])
    if data.draw(st.booleans()):  # damage a real file a little
        for _ in range(data.draw(st.integers(1, 4))):
            body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    else:  # or make one up
        body = bytearray(data.draw(st.binary(max_size=300)))
    try:
        decoded = decode_bytes(with_checksum(bytes(body)), sizes, 2)
    except TaskFileError:
        return
    assert decoded.numel() == packed_size(sum(sizes), 2)


@pytest.mark.parametrize("name", CODECS)
def test_data_that_is_not_flat_uint8_is_refused(name):
    codec = get_mask_codec(name)
    with pytest.raises(TaskFileError, match="flat uint8"):
        codec.decode(torch.zeros(4, dtype=torch.int32), {}, [8], 1)


def test_packed_data_of_the_wrong_size_is_refused():
    with pytest.raises(TaskFileError, match="take 2 bytes, found 3"):
        get_mask_codec("packed").decode(torch.zeros(3, dtype=torch.uint8), {}, [9], 1)


def test_unknown_codec_names_say_which_are_known():
    with pytest.raises(TaskFileError, match=r"unknown mask codec 'brotli': expected one of \["):
        get_mask_codec("brotli")


def test_a_codec_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_mask_codec(PackedCodec())


@pytest.mark.parametrize("name", CODECS)
def test_encoding_checks_its_input(name):
    codec = get_mask_codec(name)
    with pytest.raises(ValueError, match="expected 5 uint8 codes"):
        codec.encode(torch.zeros(4, dtype=torch.uint8), [5], 1)
    with pytest.raises(ValueError, match="codes must be < 2"):
        codec.encode(torch.full((4,), 2, dtype=torch.uint8), [4], 1)
    with pytest.raises(ValueError, match="bits must be one of"):
        codec.encode(torch.zeros(4, dtype=torch.uint8), [4], 3)
