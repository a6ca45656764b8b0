"""The uniform representation of a dataset's splits, and the seeded stratified holdout.

Every source (folders, list files, the paper's official layouts) is reduced to `(path, label)`
samples so the training code never cares where the data came from. Validation must always exist
for model selection, so when a source ships without one it is carved out of train here.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from piggyback.errors import DataError

Origin = Literal["official", "holdout"]


class Sample(NamedTuple):
    """One image and its class index; a plain tuple, like torchvision's `ImageFolder.samples`."""

    path: Path
    label: int


@dataclass(frozen=True)
class SourceSplits:
    """What a source provides on its own, before a missing validation split is held out."""

    train: list[Sample]
    class_names: list[str]
    val: list[Sample] | None = None
    test: list[Sample] | None = None
    test_origin: Origin = "official"


@dataclass(frozen=True)
class DatasetSplits:
    """Train, val and test samples of one task; val is always present, test may be absent.

    `val_origin` and `test_origin` say whether a split is the dataset's own ("official") or was
    held out of train with a seed ("holdout"), so results can be reported honestly.
    """

    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None
    class_names: list[str]
    source: str
    root: Path
    val_origin: Origin
    test_origin: Origin | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's `n` samples to hold out.

    `fraction * n` rounded half up, but at least one (so every class is validated) and at most
    `n - 1` (so every class is still trained on); a class with a single sample keeps it.
    """
    if n < 2:
        return 0
    return min(max(1, math.floor(fraction * n + 0.5)), n - 1)


def stratified_holdout(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split `samples` into (kept, held_out), holding out `fraction` of every class.

    Hand-written rather than sklearn's `train_test_split` (not a dependency), whose stratified
    rounding is over the whole set, so a rare class may get no held-out sample or none left to
    train on. The draw depends only on the seed and the set of samples, not on their order (each
    class is sorted before sampling), so a re-listed folder gives the same split. Both outputs keep
    the input order.
    """
    if not 0 < fraction < 1:
        raise DataError(f"holdout fraction must be between 0 and 1 (exclusive), got {fraction}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        by_class[sample.label].append(index)
    rng = random.Random(seed)
    held: set[int] = set()
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda i: (str(samples[i].path), i))
        held.update(rng.sample(members, holdout_count(len(members), fraction)))
    kept = [s for i, s in enumerate(samples) if i not in held]
    held_out = [s for i, s in enumerate(samples) if i in held]
    return kept, held_out


def complete_splits(
    found: SourceSplits, *, source: str, root: Path, val_fraction: float, seed: int
) -> DatasetSplits:
    """Check what a source found and hold out a validation split from train when it has none."""
    _check_found(found, root)
    if found.val is not None:
        train, val, val_origin = found.train, found.val, "official"
    else:
        train, val = stratified_holdout(found.train, val_fraction, seed)
        val_origin = "holdout"
        if not val:
            raise DataError(
                f"cannot hold out a validation split from {root}: every class has fewer than 2 "
                "training images"
            )
    return DatasetSplits(
        train=train,
        val=val,
        test=found.test,
        class_names=found.class_names,
        source=source,
        root=root,
        val_origin=val_origin,
        test_origin=None if found.test is None else found.test_origin,
    )


def _check_found(found: SourceSplits, root: Path) -> None:
    """Reject what no training run can use: fewer than 2 classes, empty splits, bad labels."""
    if len(found.class_names) < 2:
        raise DataError(
            f"{root} has {len(found.class_names)} class(es) {found.class_names}: a classification "
            "task needs at least 2"
        )
    splits = {"train": found.train, "val": found.val, "test": found.test}
    for name, samples in splits.items():
        if samples is None:
            continue
        if not samples:
            raise DataError(f"the {name} split of {root} has no images")
        bad = [s for s in samples if not 0 <= s.label < len(found.class_names)]
        if bad:
            raise DataError(
                f"the {name} split of {root} has labels outside 0..{len(found.class_names) - 1}, "
                f"e.g. {bad[0].path} -> {bad[0].label}"
            )
