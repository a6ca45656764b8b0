"""ImageDataset: RGB decoding, unreadable images (warned about, or strict), attributes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from data_fixtures import write_garbage, write_image, write_truncated_jpeg
from PIL import Image
from torch.utils.data import DataLoader

from piggyback.data import ImageDataset, UnreadableImageWarning, build_transforms, load_rgb
from piggyback.data.transforms import resize_size
from piggyback.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def good(tmp_path: Path) -> list[tuple[Path, int]]:
    """Four readable images of two classes, in four pixel formats."""
    return [
        (write_image(tmp_path / "rgb.jpg"), 0),
        (write_image(tmp_path / "gray.png", mode="L"), 0),
        (write_image(tmp_path / "palette.png", mode="P"), 1),
        (write_image(tmp_path / "rgba.png", mode="RGBA"), 1),
    ]


def test_images_come_back_rgb_with_their_labels(good) -> None:
    dataset = ImageDataset(good, class_names=["a", "b"])
    assert len(dataset) == 4 and dataset.skipped == []
    for (image, label), (_, expected) in zip(dataset, good, strict=True):
        assert isinstance(image, Image.Image) and image.mode == "RGB" and label == expected
    assert dataset.targets == [0, 0, 1, 1]
    assert dataset.classes == dataset.class_names == ["a", "b"]
    assert [path for path, _ in dataset.samples] == [path for path, _ in good]


def test_default_class_names_and_label_check(good) -> None:
    assert ImageDataset(good).class_names == ["0", "1"]
    with pytest.raises(DataError, match="do not fit the 1 class names"):
        ImageDataset(good, class_names=["a"])


def test_transform_gives_batches_of_tensors(good) -> None:
    dataset = ImageDataset(good, build_transforms(16, MEAN, STD, train=True))
    images, labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1, 1]


def test_unreadable_images_are_skipped_with_one_warning(tmp_path: Path, good) -> None:
    broken = [
        (write_garbage(tmp_path / "html_page.jpg"), 0),
        (tmp_path / "never_written.png", 1),
    ]
    with pytest.warns(UnreadableImageWarning) as record:
        dataset = ImageDataset(good + broken)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipping 2 of 6 images" in message
    assert "html_page.jpg" in message and "never_written.png" in message
    assert len(dataset) == 4 and [path for path, _ in dataset.skipped] == [p for p, _ in broken]


def test_unreadable_images_with_strict_raise(tmp_path: Path, good) -> None:
    broken = (write_garbage(tmp_path / "html_page.jpg"), 0)
    with pytest.raises(DataError, match=r"1 of 5 images cannot be read: .*html_page.jpg"):
        ImageDataset([*good, broken], strict=True)


def test_no_readable_image_at_all(tmp_path: Path) -> None:
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="none of the 1"):
        ImageDataset([(write_garbage(tmp_path / "x.jpg"), 0)])
    with pytest.raises(DataError, match="at least one sample"):
        ImageDataset([])


def test_truncated_image_is_replaced_by_the_next_one(tmp_path: Path, good) -> None:
    """It passes the cheap up-front check, so the guard in __getitem__ must catch it."""
    samples = [good[0], (write_truncated_jpeg(tmp_path / "cut.jpg"), 1), good[1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the up-front check must not complain
        dataset = ImageDataset(samples, build_transforms(8, MEAN, STD, train=False))
    assert len(dataset) == 3
    with pytest.warns(UnreadableImageWarning, match=r"cut\.jpg .*cannot be decoded"):
        image, label = dataset[1]
    assert label == good[1][1] and image.shape == (3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad now: skipped silently, same answer
        assert dataset[1][1] == label
    assert dataset[-1][1] == good[1][1]


def test_truncated_image_with_strict_raises(tmp_path: Path, good) -> None:
    dataset = ImageDataset([good[0], (write_truncated_jpeg(tmp_path / "cut.jpg"), 1)], strict=True)
    with pytest.raises(
        DataError, match=r"cut\.jpg passed the up-front check but cannot be decoded"
    ):
        dataset[1]


def test_index_out_of_range(good) -> None:
    with pytest.raises(IndexError):
        ImageDataset(good)[4]


def test_draft_decodes_large_jpegs_smaller(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.jpg", size=400)
    assert load_rgb(path).size == (400, 400)
    assert load_rgb(path, draft_size=100).size == (100, 100)
    assert load_rgb(path, draft_size=120).size == (200, 200)  # never below the asked size
    dataset = ImageDataset([(path, 0)], draft_size=resize_size(48))
    assert dataset[0][0].size == (100, 100)
