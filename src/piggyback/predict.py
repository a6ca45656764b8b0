"""Classifying image files with one task of a model.

A task only works on images prepared the way it was trained, so the images go through the task's
own preprocessing (`piggyback.preprocess`: what training recorded, else the backbone's config).

Prediction runs the task merged into a plain copy of the backbone (`PiggybackModel.merge`), so the
model passed in is left exactly as it was (active task, device, training mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from piggyback.data import ImageDataset
from piggyback.errors import DataError
from piggyback.preprocess import eval_transform, resolve_preprocess
from piggyback.task_prediction import class_names

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel
    from piggyback.predictor import Predictor
    from piggyback.task_prediction import TaskPrediction

__all__ = [
    "IMAGE_EXTENSIONS",
    "Prediction",
    "collect_images",
    "eval_transform",
    "predict",
    "predict_files",
    "resolve_preprocess",
]

#: Suffixes (lower case) of the files taken from folders; the same list torchvision's ImageFolder
#: uses, so that what trains from a folder also predicts from it.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS)


# -- finding images -----------------------------------------------------------------------------


def collect_images(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files named by `paths`, in argument order, each folder's images sorted.

    A file is taken as given (the user named it; if it is no image it is reported when read); a
    folder contributes every file below it with an image suffix (case-insensitive), hidden files
    and folders excepted. A file reached twice is listed once.
    """
    if isinstance(paths, str | Path):  # one path, not a sequence of characters
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            images = _images_below(path)
            if not images:
                raise DataError(
                    f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
            found += images
        else:
            raise DataError(f"{path} does not exist: expected an image file or a folder")
    return list(dict.fromkeys(found))


def _images_below(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


# -- predicting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """The `top` classes of one image as (class name, probability), most probable first."""

    path: Path
    top: list[tuple[str, float]]

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `--json` output and logs)."""
        return {
            "path": str(self.path),
            "top": [{"class": name, "probability": prob} for name, prob in self.top],
        }


def predict(
    model: PiggybackModel,
    task: str | None,
    paths: str | Path | Sequence[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[Prediction]:
    """Top-k classes of every image in `paths` (see `collect_images`), in that order.

    Unreadable images follow `ImageDataset`: they are left out with one UnreadableImageWarning
    (so one bad file does not cost a whole folder's predictions); a DataError is raised only when
    none can be read. `top_k` is clipped to the number of classes. `image_size`, `mean` and `std`
    override the task's preprocessing (see `resolve_preprocess`).
    """
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    files = collect_images(paths)
    transform = eval_transform(model, task, image_size, mean=mean, std=std)
    state = model.task(task)
    network = model.merge(task).to(device).eval()
    # The label of each sample is its index: if ImageDataset replaces an image that fails to
    # decode by the next one, the index still says which file a result belongs to.
    dataset = ImageDataset([(p, i) for i, p in enumerate(files)], transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    results: dict[int, Prediction] = {}
    with torch.inference_mode():
        for images, indices in loader:
            probs = network(images.to(device)).float().softmax(dim=1).cpu()
            names = class_names(state.class_names, probs.shape[1], state.task_name)
            values, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
            for index, row_values, row_classes in zip(
                indices.tolist(), values.tolist(), classes.tolist(), strict=True
            ):
                top = [(names[c], v) for c, v in zip(row_classes, row_values, strict=True)]
                results.setdefault(index, Prediction(files[index], top))
    return [results[i] for i in sorted(results)]


# -- many tasks -------------------------------------------------------------------------------


def predict_files(
    predictor: Predictor,
    paths: str | Path | Sequence[str | Path],
    tasks: Sequence[str],
    *,
    top_k: int = 5,
    batch_size: int = 32,
) -> list[tuple[Path, TaskPrediction]]:
    """`(file, answer)` for every image in `paths` and every entry of `tasks`, image by image.

    `tasks` holds task names and/or "auto" (see `Predictor.predict`). Unreadable images are left
    out with one UnreadableImageWarning, as in `predict`.
    """
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    files = collect_images(paths)
    # transform=None: PIL images; the Predictor applies each task's own preprocessing.
    dataset = ImageDataset([(p, i) for i, p in enumerate(files)])
    answers: dict[int, list[TaskPrediction]] = {}
    for start in range(0, len(dataset), batch_size):
        images, indices = zip(
            *(dataset[i] for i in range(start, start + batch_size) if i < len(dataset)), strict=True
        )
        found = predictor.predict_each(list(images), tasks, top_k=top_k)
        for index, per_task in zip(indices, found, strict=True):
            answers.setdefault(index, per_task)
    return [(files[i], answer) for i in sorted(answers) for answer in answers[i]]
