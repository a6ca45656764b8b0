"""The paper's transforms, scaled to any input size.

Piggyback (like its PackNet code base) trains on `Resize(256) + RandomResizedCrop(224) + flip` and
evaluates on `Resize(256) + CenterCrop(224)`; for another `image_size` the 256/224 ratio is kept so
a smaller backbone input sees the same field of view. The sizes and statistics a task uses come
from `piggyback.preprocess.Preprocess` (the backbone's own crop fraction where it has one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from piggyback.errors import DataError

if TYPE_CHECKING:  # torchvision loads with the first pipeline: reading a task's record of
    from torchvision.transforms import v2  # its preprocessing (`piggyback info`) needs none

MAX_ASPECT_RATIO = 16


class CapAspectRatio:
    """Crop the long side of a PIL image to at most `max_ratio` times its short side, centred.

    Resizing the short side first makes a thin image huge: a 40000 x 1 PNG of 200 bytes became
    a 5,840,000 x 146 picture (4 GB in a server) before the crop kept 128 x 128 of it. Images up
    to `max_ratio` are left untouched. For longer ones, evaluation's centre crop never reaches
    the borders cut (its sampling grid may shift by under a pixel); training's random crops
    could, so on such rare images training sees only their central 16:1.
    """

    def __init__(self, max_ratio: float = MAX_ASPECT_RATIO) -> None:
        self.max_ratio = max_ratio

    def __call__(self, image: Any) -> Any:
        if not isinstance(image, Image.Image):
            return image
        width, height = image.size
        short = min(width, height)
        longest = int(short * self.max_ratio)
        if max(width, height) <= longest:
            return image
        if width > height:
            left = (width - longest) // 2
            return image.crop((left, 0, left + longest, height))
        top = (height - longest) // 2
        return image.crop((0, top, width, top + longest))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_ratio={self.max_ratio})"


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
    from torchvision.transforms import InterpolationMode, v2

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
            CapAspectRatio(),
            v2.Resize(resize or resize_size(image_size), interpolation=mode),
            *crop,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
