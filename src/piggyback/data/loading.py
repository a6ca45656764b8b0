"""The entry point of the data layer: a path and a format (or "auto") in, `DatasetSplits` out."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from piggyback.data.formats import DOWNLOADABLE, FORMATS
from piggyback.data.listfiles import LIST_SUFFIXES, read_list_folder, read_lists
from piggyback.data.sources import (
    is_image_name,
    read_cars,
    read_classfolders,
    read_cub,
    read_flowers102,
    read_imagefolder,
    read_sketch,
    read_wikiart,
)
from piggyback.data.splits import DatasetSplits, SourceSplits, complete_splits
from piggyback.errors import DataError


def load_splits(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.2,
    download: bool = False,
) -> DatasetSplits:
    """Read a dataset into train/val/test samples; val is always filled.

    Val is the dataset's own when it has one, else a stratified holdout of `val_fraction` of each
    train class drawn with `seed` (and removed from train). Datasets without a test split (sketch,
    unsplit class folders) get a stratified `test_fraction` one, always drawn with the same seed so
    every run is tested on the same images. `download` is passed to torchvision (flowers102, cars).
    """
    root = Path(path).expanduser()
    _check_arguments(root, fmt, val_fraction, test_fraction, download)
    if fmt == "auto":
        fmt = detect_format(root)
    found = _read(fmt, root, test_fraction, download)
    return complete_splits(found, source=fmt, root=root, val_fraction=val_fraction, seed=seed)


def detect_format(root: Path) -> str:
    """The format of `root`, from the files each layout is known by (first match wins)."""
    if root.is_file():
        return "list"
    for fmt, _, matches in _DETECTORS:
        if matches(root):
            return fmt
    looked_for = "; ".join(f"{fmt}: {what}" for fmt, what, _ in _DETECTORS)
    raise DataError(f"cannot tell the dataset format of {root}. Looked for {looked_for}")


def _check_arguments(
    root: Path, fmt: str, val_fraction: float, test_fraction: float, download: bool
) -> None:
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise DataError(f"{name} must be between 0 and 1 (exclusive), got {value}")
    if download and fmt not in DOWNLOADABLE:
        raise DataError(f"download=True needs the format {' or '.join(DOWNLOADABLE)}, not {fmt!r}")
    if not download and not root.exists():
        raise DataError(f"{root} does not exist: expected a dataset folder or a list file")


def _read(fmt: str, root: Path, test_fraction: float, download: bool) -> SourceSplits:
    match fmt:
        case "imagefolder":
            return read_imagefolder(root)
        case "list":
            return read_lists(root) if root.is_file() else read_list_folder(root)
        case "classfolders":
            return read_classfolders(root, test_fraction)
        case "cub":
            return read_cub(root)
        case "cars":
            return read_cars(root, download=download)
        case "flowers102":
            return read_flowers102(root, download=download)
        case "sketch":
            return read_sketch(root, test_fraction)
        case _:  # "wikiart", the last of FORMATS
            return read_wikiart(root, test_fraction)


def _exists_in(*names: str) -> Callable[[Path], bool]:
    """A detector: does `root/<name>` exist for one of the names."""
    return lambda root: any((root / name).exists() for name in names)


def _has_class_folders(root: Path) -> bool:
    """Some sub-folder holds an image directly (so `CUB_200_2011/` alone is not mistaken)."""
    return any(
        entry.is_dir() and any(_is_image(child) for child in os.scandir(entry))
        for entry in os.scandir(root)
        if not entry.name.startswith(".")
    )


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and is_image_name(entry.name)


_DETECTORS: tuple[tuple[str, str, Callable[[Path], bool]], ...] = (
    ("flowers102", "[flowers-102/]setid.mat", _exists_in("setid.mat", "flowers-102/setid.mat")),
    (
        "cub",
        "[CUB_200_2011/]train_test_split.txt",
        _exists_in("train_test_split.txt", "CUB_200_2011/train_test_split.txt"),
    ),
    (
        "cars",
        "[stanford_cars/]devkit/cars_meta.mat",
        _exists_in("devkit/cars_meta.mat", "stanford_cars/devkit/cars_meta.mat"),
    ),
    ("imagefolder", "train/<class>/", _exists_in("train")),
    ("list", "train" + "|".join(LIST_SUFFIXES), _exists_in(*(f"train{s}" for s in LIST_SUFFIXES))),
    ("sketch", "png/<class>/", _exists_in("png")),
    ("classfolders", "<class>/<image>", _has_class_folders),
)
