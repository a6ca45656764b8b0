"""Tiny fabricated dataset trees, one per supported layout, for the data-layer tests.

Images are 8x8; the `.mat` files are written with scipy in the structure of the official devkits
(the same structure torchvision's readers expect), so the readers see what a real download holds.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def write_image(path: Path, *, mode: str = "RGB", size: int = 8, value: int = 128) -> Path:
    """A small solid image, format taken from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode in ("L", "P") else (value,) * len(mode)
    Image.new(mode, (size, size), color).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header parses (so `verify()` passes) but decoding fails."""
    pixels = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_garbage(path: Path) -> Path:
    """Random bytes under an image name, like an HTML error page saved as .jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).bytes(300))
    return path


def make_class_folders(
    folder: Path, counts: Mapping[str, int], *, suffix: str = ".jpg", mode: str = "RGB"
) -> list[Path]:
    """`folder/<class>/<i><suffix>` with `counts[class]` images each."""
    return [
        write_image(folder / name / f"{i:03d}{suffix}", mode=mode)
        for name, count in counts.items()
        for i in range(count)
    ]


def make_imagefolder(
    root: Path,
    train: Mapping[str, int],
    val: Mapping[str, int] | None = None,
    test: Mapping[str, int] | None = None,
) -> Path:
    for split, counts in (("train", train), ("val", val), ("test", test)):
        if counts is not None:
            make_class_folders(root / split, counts)
    return root


def write_list(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# CUB: 3 classes; images 1..12, class = (id - 1) // 4 + 1, ids 1, 2 of each class in train.
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root: Path) -> Path:
    """`root/CUB_200_2011/` with 3 classes x 4 images, 2 train + 2 test per class."""
    base = root / "CUB_200_2011"
    images, split, labels = [], [], []
    for image_id in range(1, 13):
        class_id = (image_id - 1) // 4 + 1
        relpath = f"{CUB_CLASSES[class_id - 1]}/img_{image_id:04d}.jpg"
        write_image(base / "images" / relpath)
        images.append(f"{image_id} {relpath}")
        split.append(f"{image_id} {int((image_id - 1) % 4 < 2)}")
        labels.append(f"{image_id} {class_id}")
    write_list(base / "images.txt", images)
    write_list(base / "train_test_split.txt", split)
    write_list(base / "image_class_labels.txt", labels)
    write_list(base / "classes.txt", [f"{i} {name}" for i, name in enumerate(CUB_CLASSES, 1)])
    return root


CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def _cars_annotations(path: Path, classes: list[int], images: Path) -> None:
    """A devkit-style struct array: bbox_x1..bbox_y2, class (1-based), fname."""
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    records = np.zeros((1, len(classes)), dtype=[(name, "O") for name in fields])
    for i, class_id in enumerate(classes):
        fname = f"{i + 1:05d}.jpg"
        write_image(images / fname)
        records[0, i] = (
            np.uint8(1),
            np.uint8(1),
            np.uint8(8),
            np.uint8(8),
            np.uint8(class_id),
            fname,
        )
    scipy.io.savemat(path, {"annotations": records})


def make_cars(root: Path) -> Path:
    """`root/stanford_cars/` in torchvision's layout: 3 classes, 9 train and 6 test images."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(CARS_CLASSES, dtype=object).reshape(1, -1)  # a 1xK cell array
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    _cars_annotations(base / "devkit" / "cars_train_annos.mat", [1, 2, 3] * 3, base / "cars_train")
    _cars_annotations(base / "cars_test_annos_withlabels.mat", [3, 2, 1] * 2, base / "cars_test")
    return root


def make_flowers(root: Path, num_classes: int = 3) -> Path:
    """`root/flowers-102/`: 6 images per class, official ids 1-2 train, 3-4 val, 5-6 test."""
    base = root / "flowers-102"
    count = 6 * num_classes
    for image_id in range(1, count + 1):
        write_image(base / "jpg" / f"image_{image_id:05d}.jpg")
    labels = np.repeat(np.arange(1, num_classes + 1), 6).astype(np.uint8)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    ids = np.arange(1, count + 1).reshape(num_classes, 6)
    set_ids = {
        key: ids[:, cols].ravel().reshape(1, -1).astype(np.uint16)
        for key, cols in (("trnid", [0, 1]), ("valid", [2, 3]), ("tstid", [4, 5]))
    }
    scipy.io.savemat(base / "setid.mat", set_ids)
    return root


def make_sketch(root: Path, counts: Mapping[str, int]) -> Path:
    """`root/png/<class>/*.png`, grayscale like the TU-Berlin sketches, plus its filelist.txt."""
    paths = make_class_folders(root / "png", counts, suffix=".png", mode="L")
    write_list(root / "png" / "filelist.txt", [str(p.relative_to(root / "png")) for p in paths])
    return root
