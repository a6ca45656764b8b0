"""The images a `Predictor` accepts, made into network inputs with each task's own preprocessing.

A request may hold PIL images, file paths, encoded bytes (an upload) or tensors that the caller
has already preprocessed (CHW, or NCHW for several). Tasks of one model may have been trained at
different image sizes or normalizations, and a routed request needs the same picture prepared
for routing and then for the chosen task, so each picture is decoded once and transformed once
per distinct preprocessing (`PreparedImages`).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from PIL import Image
from torch import Tensor

from piggyback.errors import DataError, TaskError
from piggyback.images import decode_image

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel

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
    if isinstance(images, memoryview):  # a buffer of one file's bytes, not a list of numbers
        return [bytes(images)]
    if not isinstance(images, Iterable):
        raise DataError(
            f"cannot read images from a {type(images).__name__}: pass an image (PIL image, "
            "path, bytes, CHW tensor) or a list of them"
        )
    return list(images)


def decode(image: ImageInput) -> Image.Image | Tensor:
    """A PIL RGB image (from a PIL image, a path or bytes; see `decode_image`), or a CHW tensor
    as given (already preprocessed)."""
    if isinstance(image, Tensor):
        if image.dim() != 3:
            raise DataError(
                f"a preprocessed image must be a CHW tensor, got shape {tuple(image.shape)}"
            )
        return preprocessed(image)
    if isinstance(image, memoryview):
        image = bytes(image)
    if isinstance(image, Image.Image | str | os.PathLike | bytes | bytearray):
        return decode_image(image)
    raise DataError(
        f"cannot read an image from a {type(image).__name__}: expected a PIL image, a path, "
        "bytes or a preprocessed CHW tensor"
    )


def preprocessed(tensor: Tensor) -> Tensor:
    """A tensor taken as preprocessed, refused unless floating: uint8 pixels (what
    torchvision.io.read_image returns) are neither scaled nor normalized, and guessing how is
    how answers go silently wrong."""
    if not tensor.is_floating_point():
        raise DataError(
            f"an image tensor of {tensor.dtype} cannot be used as given: tensors are taken as "
            "preprocessed (float, resized and normalized as the task's preprocessing says); "
            "preprocess it first, or pass the image file, its bytes or a PIL image"
        )
    return tensor


def network_batch(batch: Any, model: PiggybackModel) -> Tensor:
    """A preprocessed NCHW batch on `model`'s device, in its floating dtype (float64 or float16
    tensors are converted: the values mean the same)."""
    if not isinstance(batch, Tensor) or batch.dim() != 4:
        shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise DataError(
            f"expected a preprocessed NCHW batch, got shape {shape}: for one CHW image pass "
            "image[None]"
        )
    weights = (p for p in model.backbone.parameters() if p.is_floating_point())
    reference = next(weights, None)
    dtype = torch.float32 if reference is None else reference.dtype
    return preprocessed(batch).to(model.device, dtype)


def as_task_list(tasks: Any) -> list[str]:
    """`tasks` as a list of names: one name (or "auto"), or a list of them."""
    if isinstance(tasks, str):
        return [tasks]
    names = list(tasks) if isinstance(tasks, Iterable) else None
    if names is None or not all(isinstance(name, str) for name in names):
        raise TaskError(
            f"tasks must be a task name, 'auto' or a list of them (one per image), got {tasks!r}"
        )
    return names


def whole_number(value: object) -> int | None:
    """`value` as an int when it is one (numpy integers too), else None (bools included)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


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

    def batch(
        self, indices: Sequence[int], preprocess: dict[str, Any], user: str = "the task"
    ) -> Tensor:
        """The pictures at `indices` as one NCHW batch prepared with `preprocess` for `user`
        (named in errors).

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
                else:
                    _check_channels(index, picture, preprocess, user)
                self._done[index, key] = picture
            tensors.append(self._done[index, key])
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise DataError(
                f"images for one task have different shapes {sorted(shapes)}: give preprocessed "
                "tensors of one size per task, or PIL images / paths / bytes"
            )
        return torch.stack(tensors)


def _check_channels(index: int, picture: Tensor, preprocess: dict[str, Any], user: str) -> None:
    """A caller's tensor has as many channels as the preprocessing normalizes."""
    channels = len(preprocess["mean"])
    if picture.shape[0] != channels:
        raise DataError(
            f"image {index} is a tensor of {picture.shape[0]} channel(s), {user} takes "
            f"{channels}: pass {channels}-channel CHW tensors, or PIL images / paths / bytes"
        )
