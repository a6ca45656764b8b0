"""A map-style dataset over `(path, label)` samples that copes with unreadable images.

Real downloads hold a few broken files (truncated transfers, HTML error pages saved as .jpg). A
run should neither die on one at epoch 3 nor silently train on fewer images, so they are found up
front (cheaply: header + `verify()`) and reported once; the rare file that passes that check but
fails to decode is replaced by the next readable sample so batches keep their size. `strict=True`
turns every such case into a DataError instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from piggyback.data.splits import Sample
from piggyback.errors import DataError, ImageError
from piggyback.images import decode_image, verify_image

# Up-front checks are file reads, so threads overlap them even on 2 cores.
CHECK_THREADS = 8


class UnreadableImageWarning(UserWarning):
    """Some images cannot be read and are left out (or replaced, when found while decoding)."""


def load_rgb(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB the one way every path does (`piggyback.images`)."""
    return decode_image(path, draft_size=draft_size)


def check_image(path: Path) -> str | None:
    """Why `path` cannot be read (a one-line message naming it), or None. Cheap: headers only."""
    try:
        verify_image(path)
    except ImageError as error:
        return str(error)
    return None


class ImageDataset(Dataset):
    """`(image, label)` pairs, the image passed through `transform` (a PIL RGB image without one).

    `samples`, `targets` and `class_names` (alias `classes`) describe the readable images only;
    `skipped` lists `(path, reason)` for those left out (the reason names the path too).
    `draft_size`: see `piggyback.images.decode_image`.
    """

    def __init__(
        self,
        samples: Iterable[tuple[str | Path, int]],
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        class_names: Sequence[str] | None = None,
        strict: bool = False,
        draft_size: int | None = None,
    ) -> None:
        candidates = [Sample(Path(path), int(label)) for path, label in samples]
        if not candidates:
            raise DataError("ImageDataset needs at least one sample")
        self.skipped = _unreadable(candidates)
        if self.skipped:
            _report(self.skipped, len(candidates), strict)
        bad = {path for path, _ in self.skipped}
        self.samples = [s for s in candidates if s.path not in bad]
        if not self.samples:
            raise DataError(f"none of the {len(candidates)} images can be read")
        self.targets = [s.label for s in self.samples]
        self.class_names = _class_names(class_names, self.targets)
        self.transform = transform
        self.strict = strict
        self.draft_size = draft_size
        self._undecodable: set[int] = set()

    @property
    def classes(self) -> list[str]:
        """torchvision's name for `class_names`."""
        return self.class_names

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Sample `index`, or if it cannot be decoded the next decodable one (wrapping around)."""
        count = len(self.samples)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} samples")
        for offset in range(count):
            position = (index + offset) % count
            if position in self._undecodable:
                continue
            path, label = self.samples[position]
            try:
                image = load_rgb(path, self.draft_size)
            except ImageError as error:
                self._undecodable_found(position, error)
                continue
            return (image if self.transform is None else self.transform(image)), label
        raise DataError(f"none of the {count} images of this dataset can be decoded")

    def _undecodable_found(self, position: int, error: Exception) -> None:
        path = self.samples[position].path
        message = f"{path} passed the up-front check but cannot be decoded: {error}"
        if self.strict:
            raise DataError(message) from error
        self._undecodable.add(position)
        warnings.warn(
            f"{message}; using the next readable image instead",
            UnreadableImageWarning,
            stacklevel=3,
        )


def _unreadable(samples: list[Sample]) -> list[tuple[Path, str]]:
    paths = list(dict.fromkeys(s.path for s in samples))
    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        reasons = pool.map(check_image, paths)
    return [
        (path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None
    ]


def _report(skipped: list[tuple[Path, str]], total: int, strict: bool) -> None:
    """One DataError (strict) or one warning for all unreadable images, naming a few."""
    shown = 20 if strict else 5
    listing = "; ".join(reason for _, reason in skipped[:shown])  # each names its image
    if len(skipped) > shown:
        listing += f"; ... and {len(skipped) - shown} more"
    if strict:
        raise DataError(f"{len(skipped)} of {total} images cannot be read: {listing}")
    warnings.warn(
        f"skipping {len(skipped)} of {total} images that cannot be read: {listing}",
        UnreadableImageWarning,
        stacklevel=4,
    )


def _class_names(class_names: Sequence[str] | None, targets: list[int]) -> list[str]:
    """The given names, checked against the labels; `"0"`, `"1"`, ... when none are given."""
    if class_names is None:
        return [str(i) for i in range(max(targets) + 1)]
    if min(targets) < 0 or max(targets) >= len(class_names):
        labels = f"{min(targets)}..{max(targets)}"
        raise DataError(f"labels {labels} do not fit the {len(class_names)} class names")
    return list(class_names)
