"""Readers of the supported on-disk layouts: class folders and the paper's official downloads.

Each reader returns the splits the layout itself defines (`SourceSplits`); holding out a missing
validation split is left to `piggyback.data.loading`. Readers only parse metadata and list files:
whether each image is readable is checked once, for all sources alike, by `ImageDataset`.

The official `.mat` annotations are read with scipy directly rather than through torchvision's
`Flowers102` / `StanfordCars`: those keep their samples in private attributes, only accept a fixed
sub-folder name, say just "Dataset not found" when a file is missing, and `Flowers102` rejects any
annotation file whose MD5 differs from the original. torchvision is still used to download, and
for the Flowers-102 class names.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from torchvision.datasets import Flowers102, StanfordCars
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from piggyback.data.listfiles import find_list_file, read_list_folder
from piggyback.data.splits import Sample, SourceSplits, stratified_holdout
from piggyback.errors import DataError

# Seed of the test split of datasets that ship without one (sketch, unsplit class folders). Fixed,
# not the run's seed, so runs with different seeds are evaluated on the same test images.
TEST_SPLIT_SEED = 0

CUB_FILES = (
    "images.txt",
    "train_test_split.txt",
    "image_class_labels.txt",
    "classes.txt",
    "images",
)
CARS_FILES = (
    "devkit/cars_meta.mat",
    "devkit/cars_train_annos.mat",
    "cars_test_annos_withlabels.mat",
    "cars_train",
    "cars_test",
)
FLOWERS_FILES = ("imagelabels.mat", "setid.mat", "jpg")


# --- class folders ----------------------------------------------------------------------------


def read_imagefolder(root: Path) -> SourceSplits:
    """`root/train/<class>/*`, optional `root/val/<class>/*` and `root/test/<class>/*`."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root} has no train folder: expected {train_dir}/<class>/<image>")
    class_names = list_class_folders(train_dir)
    splits = {
        name: scan_class_folders(root / name, class_names)
        for name in ("val", "test")
        if (root / name).is_dir()
    }
    return SourceSplits(
        train=scan_class_folders(train_dir, class_names),
        class_names=class_names,
        val=splits.get("val"),
        test=splits.get("test"),
    )


def read_classfolders(root: Path, test_fraction: float) -> SourceSplits:
    """`root/<class>/*` with no split at all: a seeded stratified test split is held out."""
    class_names = list_class_folders(root)
    train, test = stratified_holdout(
        scan_class_folders(root, class_names), test_fraction, TEST_SPLIT_SEED
    )
    return SourceSplits(train=train, class_names=class_names, test=test, test_origin="holdout")


def list_class_folders(folder: Path) -> list[str]:
    """Sorted class folder names, as torchvision's `ImageFolder` orders them.

    Hand-written instead of `torchvision.datasets.folder.find_classes` only to skip hidden folders
    (`.ipynb_checkpoints`, `.git`) that would otherwise become empty classes.
    """
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: expected a folder of class folders")
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{folder} holds no class folders: expected {folder}/<class>/<image>")
    return names


def scan_class_folders(folder: Path, class_names: Sequence[str]) -> list[Sample]:
    """Images under `folder/<class>/` labelled by their index in `class_names` (train's classes).

    A class folder that `class_names` lacks, or one without images, is an error naming it: both
    are usually a wrong path or an unfinished extraction, not something to train around.
    """
    found = list_class_folders(folder)
    index_of = {name: i for i, name in enumerate(class_names)}
    unknown = [name for name in found if name not in index_of]
    if unknown:
        raise DataError(
            f"class folders {[str(folder / n) for n in unknown]} are not classes of the train split"
        )
    class_to_idx = {name: index_of[name] for name in found}
    samples = make_dataset(str(folder), class_to_idx, is_valid_file=is_image_name, allow_empty=True)
    counts = Counter(label for _, label in samples)
    empty = [str(folder / name) for name in found if counts[index_of[name]] == 0]
    if empty:
        raise DataError(f"class folders without images ({', '.join(IMG_EXTENSIONS)}): {empty}")
    return [Sample(Path(path), label) for path, label in samples]


def is_image_name(path: str) -> bool:
    """An image by extension, skipping hidden files such as macOS's `._name.jpg` resource forks."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


# --- the paper's datasets -----------------------------------------------------------------------


def read_sketch(root: Path, test_fraction: float) -> SourceSplits:
    """TU-Berlin sketches, `root/png/<class>/*.png` or `root/<class>/*.png`; no official split."""
    return read_classfolders(root / "png" if (root / "png").is_dir() else root, test_fraction)


def read_wikiart(root: Path, test_fraction: float) -> SourceSplits:
    """WikiArt as list files (`train.csv`, `test.csv`) when present, else `root/<style>/*`."""
    if find_list_file(root, "train") is not None:
        return read_list_folder(root)
    return read_classfolders(root, test_fraction)


def read_cub(root: Path) -> SourceSplits:
    """CUB-200-2011 with its official train/test split (`train_test_split.txt`), no val."""
    base = locate(root, "CUB_200_2011", CUB_FILES, "CUB-200-2011")
    paths = read_id_table(base / "images.txt")
    is_train = read_id_table(base / "train_test_split.txt")
    class_of = read_id_table(base / "image_class_labels.txt")
    classes = read_id_table(base / "classes.txt")
    index_of = {str(class_id): i for i, class_id in enumerate(sorted(classes))}
    splits: dict[str, list[Sample]] = {"1": [], "0": []}
    for image_id, relpath in sorted(paths.items()):
        flag = _entry(is_train, image_id, base / "train_test_split.txt", splits)
        class_id = _entry(class_of, image_id, base / "image_class_labels.txt", index_of)
        splits[flag].append(Sample(base / "images" / relpath, index_of[class_id]))
    class_names = [classes[i] for i in sorted(classes)]
    return SourceSplits(train=splits["1"], test=splits["0"], class_names=class_names)


def _entry(table: dict[int, str], image_id: int, path: Path, allowed: Container[str]) -> str:
    """The value `path` gives an image of `images.txt`, which must be one of `allowed`."""
    value = table.get(image_id)
    if value not in allowed:
        found = "no entry" if value is None else f"the unexpected value {value!r}"
        raise DataError(f"{path} has {found} for image id {image_id}")
    return value


def read_id_table(path: Path) -> dict[int, str]:
    """CUB's `<id> <value>` lines as a dict; errors name the file and line.

    Hand-written rather than `numpy.loadtxt`, which cannot keep a value holding spaces (paths, class
    names) nor say which line is bad.
    """
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) in table:
            raise DataError(f"{path}:{lineno}: expected `<id> <value>` with a new id, got {line!r}")
        table[int(fields[0])] = fields[1].strip()
    return table


def read_flowers102(root: Path, *, download: bool = False) -> SourceSplits:
    """Oxford Flowers-102 with its official train/val/test split (`setid.mat`)."""
    if download and find_base(root, "flowers-102", FLOWERS_FILES) is None:
        fetch(Flowers102, root, "flowers-102")
    base = locate(root, "flowers-102", FLOWERS_FILES, "Oxford Flowers-102")
    labels = np.atleast_1d(load_mat(base / "imagelabels.mat", "labels")["labels"]).astype(int) - 1
    set_ids = load_mat(base / "setid.mat", "trnid", "valid", "tstid")

    def split(key: str) -> list[Sample]:
        ids = np.atleast_1d(set_ids[key]).astype(int)
        if ids.size and (ids.min() < 1 or ids.max() > labels.size):
            raise DataError(f"{base / 'setid.mat'}: {key} has image ids outside 1..{labels.size}")
        return [Sample(base / "jpg" / f"image_{i:05d}.jpg", int(labels[i - 1])) for i in ids]

    return SourceSplits(
        train=split("trnid"),
        val=split("valid"),
        test=split("tstid"),
        class_names=flowers_class_names(int(labels.max()) + 1),
    )


def flowers_class_names(num_classes: int) -> list[str]:
    """torchvision's 102 Oxford flower names when it has them, else `class_001`, ..."""
    names = getattr(Flowers102, "classes", None)  # only in recent torchvision releases
    if names is not None and num_classes <= len(names):
        return list(names[:num_classes])
    return [f"class_{i:03d}" for i in range(1, num_classes + 1)]


def read_cars(root: Path, *, download: bool = False) -> SourceSplits:
    """Stanford Cars in torchvision's layout (devkit `.mat` files), official train/test, no val."""
    if download and find_base(root, "stanford_cars", CARS_FILES) is None:
        fetch(StanfordCars, root, "stanford_cars")
    base = locate(root, "stanford_cars", CARS_FILES, "Stanford Cars")
    names = np.atleast_1d(load_mat(base / "devkit/cars_meta.mat", "class_names")["class_names"])
    return SourceSplits(
        train=_cars_annotations(base / "devkit/cars_train_annos.mat", base / "cars_train"),
        test=_cars_annotations(base / "cars_test_annos_withlabels.mat", base / "cars_test"),
        class_names=[str(name) for name in names],
    )


def _cars_annotations(mat: Path, images: Path) -> list[Sample]:
    records = np.atleast_1d(load_mat(mat, "annotations")["annotations"])
    try:
        return [Sample(images / str(r["fname"]), int(r["class"]) - 1) for r in records]
    except (ValueError, IndexError) as error:  # a missing field, e.g. test annotations w/o labels
        raise DataError(f"{mat}: annotations need `fname` and `class` fields ({error})") from error


# --- helpers ------------------------------------------------------------------------------------


def find_base(root: Path, inner: str, required: Sequence[str]) -> Path | None:
    """`root/inner` or `root` itself, whichever holds all `required` entries."""
    for base in (root / inner, root):
        if all((base / name).exists() for name in required):
            return base
    return None


def locate(root: Path, inner: str, required: Sequence[str], dataset: str) -> Path:
    """Like `find_base`, but a DataError naming the missing entries when neither fits."""
    base = find_base(root, inner, required)
    if base is not None:
        return base
    checked = root / inner if (root / inner).is_dir() else root
    missing = [name for name in required if not (checked / name).exists()]
    raise DataError(
        f"{root} does not hold {dataset}: missing {missing} in {checked} "
        f"(looked in {root / inner} and {root})"
    )


def load_mat(path: Path, *keys: str) -> dict[str, Any]:
    """A `.mat` file with `squeeze_me`, as the official devkits are read; required `keys`."""
    try:
        content = scipy.io.loadmat(path, squeeze_me=True)
    except (OSError, ValueError, scipy.io.matlab.MatReadError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    missing = [key for key in keys if key not in content]
    if missing:
        raise DataError(f"{path} lacks the variables {missing}")
    return content


def fetch(dataset_cls: type, root: Path, inner: str) -> None:
    """Download through torchvision, which puts the data in `<its root>/<inner>`."""
    tv_root = root.parent if root.name == inner else root
    try:
        dataset_cls(str(tv_root), download=True)
    except (OSError, RuntimeError, ValueError) as error:
        name = dataset_cls.__name__
        raise DataError(f"torchvision could not download {name} into {tv_root}: {error}") from error
