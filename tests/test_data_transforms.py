"""The paper's resize-then-crop recipe, scaled to the input size."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from piggyback.data import build_transforms, resize_size
from piggyback.data.transforms import CapAspectRatio
from piggyback.errors import DataError


@pytest.mark.parametrize(("image_size", "expected"), [(224, 256), (112, 128), (32, 37)])
def test_resize_size_keeps_the_256_over_224_ratio(image_size: int, expected: int) -> None:
    assert resize_size(image_size) == expected


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("source_size", [(8, 8), (300, 120)])
def test_output_shape(train: bool, source_size: tuple[int, int]) -> None:
    transform = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=train)
    out = transform(Image.new("RGB", source_size, (10, 20, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_normalizes_and_is_deterministic() -> None:
    transform = build_transforms(16, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), train=False)
    image = Image.new("RGB", (40, 20), (255, 0, 128))
    out = transform(image)
    assert torch.equal(out, transform(image))
    expected = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 1.0])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-3)


def test_eval_center_crops_after_resizing_the_short_side() -> None:
    """A 2:1 image with a left half black and a right half white: the crop keeps both halves."""
    image = Image.new("L", (64, 32), 0)
    image.paste(255, (32, 0, 64, 32))
    out = build_transforms(16, (0.0,) * 3, (1.0,) * 3, train=False)(image.convert("RGB"))
    assert out[0, :, 0].max() < 0.1 and out[0, :, -1].min() > 0.9


def test_unknown_interpolation() -> None:
    with pytest.raises(DataError, match=r"unknown interpolation 'cubic'.*bicubic"):
        build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=True, interpolation="cubic")
    assert build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=False, interpolation="bicubic")


@pytest.mark.parametrize("train", [True, False])
def test_a_thin_image_is_cropped_before_resizing_instead_of_growing_huge(train, monkeypatch):
    """A 40000 x 1 image would be resized to 1,480,000 x 37 pixels for a 32 px input."""
    sizes: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recorded(image, size, *args, **kwargs):
        sizes.append(tuple(size))
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    transform = build_transforms(32, (0.5,) * 3, (0.5,) * 3, train=train)
    for source in ((40000, 1), (1, 40000), (3000, 2)):
        assert transform(Image.new("RGB", source, (10, 20, 30))).shape == (3, 32, 32)
    assert sizes and max(w * h for w, h in sizes) <= 37 * 37 * 16


def test_images_within_the_aspect_cap_are_left_as_they_are() -> None:
    cap = CapAspectRatio(4)
    wide = Image.new("RGB", (400, 100))
    assert cap(wide) is wide
    assert cap(Image.new("RGB", (401, 100))).size == (400, 100)
    tall = Image.new("L", (7, 1000))
    tall.paste(255, (0, 486, 7, 514))  # a band at the centre survives the crop
    cropped = cap(tall)
    assert cropped.size == (7, 28) and cropped.getpixel((3, 0)) == 255
    assert cap(torch.zeros(3, 1, 100)).shape == (3, 1, 100)  # tensors pass through
