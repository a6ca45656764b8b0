"""Properties of the seeded stratified holdout that carves val (and sketch's test) out of train."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from piggyback.data import Sample, stratified_holdout
from piggyback.data.splits import holdout_count
from piggyback.errors import DataError

class_sizes = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8)
fractions = st.floats(min_value=0.01, max_value=0.99)


def make_samples(sizes: list[int]) -> list[Sample]:
    return [Sample(Path(f"c{c}/{i}.jpg"), c) for c, size in enumerate(sizes) for i in range(size)]


@given(class_sizes, fractions, st.integers(0, 2**32))
def test_holdout_is_a_stratified_partition(sizes: list[int], fraction: float, seed: int) -> None:
    samples = make_samples(sizes)
    kept, held = stratified_holdout(samples, fraction, seed)
    assert sorted(kept + held) == sorted(samples) and not set(kept) & set(held)
    held_per_class = Counter(label for _, label in held)
    kept_per_class = Counter(label for _, label in kept)
    for label, size in enumerate(sizes):
        assert held_per_class[label] == holdout_count(size, fraction)
        assert kept_per_class[label] >= 1  # no class vanishes from train
        if size >= 2:
            assert held_per_class[label] >= 1  # every class is validated
    assert kept == [s for s in samples if s in set(kept)]  # input order kept


@given(class_sizes, fractions, st.integers(0, 2**32), st.randoms())
def test_holdout_depends_on_seed_not_order(
    sizes: list[int], fraction: float, seed: int, rng: random.Random
) -> None:
    samples = make_samples(sizes)
    shuffled = rng.sample(samples, len(samples))
    assert set(stratified_holdout(samples, fraction, seed)[1]) == set(
        stratified_holdout(shuffled, fraction, seed)[1]
    )


def test_other_seed_other_holdout() -> None:
    samples = make_samples([50, 50])
    assert stratified_holdout(samples, 0.2, 0) != stratified_holdout(samples, 0.2, 1)


@pytest.mark.parametrize(
    ("size", "fraction", "expected"),
    [(1, 0.5, 0), (2, 0.1, 1), (10, 0.1, 1), (15, 0.1, 2), (60, 0.1, 6), (3, 0.9, 2)],
)
def test_holdout_count(size: int, fraction: float, expected: int) -> None:
    assert holdout_count(size, fraction) == expected


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_holdout_fraction_must_be_inside_0_1(fraction: float) -> None:
    with pytest.raises(DataError, match="between 0 and 1"):
        stratified_holdout(make_samples([4]), fraction, 0)
