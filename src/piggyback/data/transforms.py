"""The paper's transforms, scaled to any input size.

Piggyback (like its PackNet code base) trains on `Resize(256) + RandomResizedCrop(224) + flip` and
evaluates on `Resize(256) + CenterCrop(224)`; for another `image_size` the 256/224 ratio is kept so
a smaller backbone input sees the same field of view. The sizes and statistics a task uses come
from `piggyback.preprocess.Preprocess` (the backbone's own crop fraction where it has one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from piggyback.errors import DataError


def resize_size(image_size: int) -> int:
    """Short side the image is resized to before cropping `image_size` (256 for 224)."""
    return round(image_size * 256 / 224)


def build_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    train: bool,
    interpolation: str = "bilinear",
    resize: int | None = None,
) -> v2.Compose:
    """PIL image -> normalized float tensor of shape (3, image_size, image_size).

    `resize` is the short side before cropping (default: `resize_size(image_size)`).
    """
    try:
        mode = InterpolationMode(interpolation)
    except ValueError as error:
        choices = ", ".join(m.value for m in InterpolationMode)
        raise DataError(
            f"unknown interpolation {interpolation!r}: expected one of {choices}"
        ) from error
    crop = (
        [v2.RandomResizedCrop(image_size, interpolation=mode), v2.RandomHorizontalFlip()]
        if train
        else [v2.CenterCrop(image_size)]
    )
    return v2.Compose(
        [
            v2.Resize(resize or resize_size(image_size), interpolation=mode),
            *crop,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
