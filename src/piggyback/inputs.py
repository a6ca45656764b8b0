"""The images a `Predictor` accepts, made into network inputs with each task's own preprocessing.

A request may hold PIL images, file paths, encoded bytes (an upload) or tensors that the caller
has already preprocessed (CHW, or NCHW for several). Tasks of one model may have been trained at
different image sizes or normalizations, and a routed request needs the same picture prepared
for routing and then for the chosen task, so each picture is decoded once and transformed once
per distinct preprocessing (`PreparedImages`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from PIL import Image
from torch import Tensor

from piggyback.errors import DataError
from piggyback.images import decode_image

Transform = Callable[[Image.Image], Tensor]


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """A picture decoded once, with the network inputs already made from it, by preprocessing.

    `Predictor.prepare` makes these where CPU time is to spare (a server's decoding threads),
    so that the one thread running the network does not also resize and normalize. `predict`
    takes one as an image: it uses the inputs it finds and makes any other from `picture`
    (a task replaced meanwhile); `picture` is None when it was not kept (a server's queue then
    holds the small inputs, not full-size photos).
    """

    picture: Image.Image | Tensor | None
    inputs: dict[str, Tensor] = field(default_factory=dict)  # preprocess_key -> CHW tensor


#: One image: a PIL image, a path, the bytes of an encoded file, a preprocessed CHW tensor, or
#: a PreparedImage.
ImageInput = Union[Image.Image, str, os.PathLike, bytes, Tensor, PreparedImage]  # noqa: UP007


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One entry per image: an NCHW tensor is N images, a single image is a list of one."""
    if isinstance(images, Tensor):
        if images.dim() == 4:
            return list(images.unbind(0))
        if images.dim() == 3:
            return [images]
        raise DataError(
            f"an image tensor must be CHW or NCHW, got shape {tuple(images.shape)}: "
            "preprocess images first, or pass PIL images, paths or bytes"
        )
    if isinstance(images, Image.Image | str | os.PathLike | bytes | bytearray | PreparedImage):
        return [images]
    return list(images)


def decode(image: ImageInput) -> Image.Image | Tensor:
    """A PIL RGB image (from a PIL image, a path or bytes; see `decode_image`), or a CHW tensor
    as given (already preprocessed)."""
    if isinstance(image, Tensor):
        if image.dim() != 3:
            raise DataError(
                f"a preprocessed image must be a CHW tensor, got shape {tuple(image.shape)}"
            )
        return image
    if isinstance(image, Image.Image | str | os.PathLike | bytes | bytearray):
        return decode_image(image)
    raise DataError(
        f"cannot read an image from a {type(image).__name__}: expected a PIL image, a path, "
        "bytes or a preprocessed CHW tensor"
    )


def preprocess_key(preprocess: dict[str, Any]) -> str:
    """A hashable, order-independent name of a preprocessing dict."""
    return json.dumps(preprocess, sort_keys=True)


def prepare_image(
    image: ImageInput,
    preprocesses: Iterable[dict[str, Any]],
    transform: Callable[[dict[str, Any]], Transform],
    *,
    keep_picture: bool = True,
) -> PreparedImage:
    """`image` decoded, with one input per distinct preprocessing (a tensor is used as given)."""
    if isinstance(image, PreparedImage):
        picture, inputs = image.picture, dict(image.inputs)
    else:
        picture, inputs = decode(image), {}
    if isinstance(picture, Tensor) or picture is None:
        return PreparedImage(picture, inputs)
    for preprocess in preprocesses:
        key = preprocess_key(preprocess)
        if key not in inputs:
            inputs[key] = transform(preprocess)(picture)
    return PreparedImage(picture if keep_picture else None, inputs)


class PreparedImages:
    """The pictures of one request, decoded once, with each preprocessing applied at most once."""

    def __init__(self, images: list[ImageInput], transform: Callable[[dict], Transform]) -> None:
        self.pictures: list[Image.Image | Tensor | None] = []
        self._transform = transform
        self._done: dict[tuple[int, str], Tensor] = {}
        for index, image in enumerate(images):
            if isinstance(image, PreparedImage):
                self.pictures.append(image.picture)
                self._done.update({(index, key): t for key, t in image.inputs.items()})
            else:
                self.pictures.append(decode(image))

    def __len__(self) -> int:
        return len(self.pictures)

    def batch(self, indices: Sequence[int], preprocess: dict[str, Any]) -> Tensor:
        """The pictures at `indices` as one NCHW batch prepared with `preprocess`.

        Tensors given by the caller are taken as already preprocessed and used unchanged.
        """
        key = preprocess_key(preprocess)
        transform = None
        tensors = []
        for index in indices:
            if (index, key) not in self._done:
                picture = self.pictures[index]
                if picture is None:
                    raise DataError(
                        f"image {index} was prepared without this task's preprocessing and "
                        "without keeping its picture: prepare it for the task it is asked for"
                    )
                if not isinstance(picture, Tensor):
                    transform = transform or self._transform(preprocess)
                    picture = transform(picture)
                self._done[index, key] = picture
            tensors.append(self._done[index, key])
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise DataError(
                f"images for one task have different shapes {sorted(shapes)}: give preprocessed "
                "tensors of one size per task, or PIL images / paths / bytes"
            )
        return torch.stack(tensors)
