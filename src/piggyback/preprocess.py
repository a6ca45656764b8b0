"""How an image is prepared for a task: one `Preprocess`, recorded with the task when it is trained.

A mask only works on inputs prepared the way it was learned, so the preprocessing is part of a
task: training records it, and evaluation, prediction, export and serving read it back. A new task
takes it from its backbone's data config (timm's keys: crop fraction, interpolation, mean and std,
the statistics its weights were trained with) at the chosen image size. A saved task keeps exactly
what it recorded, whatever the backbone's config says today. A task without a record (trained
outside the command line) falls back to its backbone's config, looked up from the model's spec.

Only centre crops are produced: timm's rare "squash" / "border" crop modes are not reproduced, but
a task is trained and evaluated with the same crop, which is what its accuracy depends on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from piggyback.data.transforms import build_transforms, resize_size
from piggyback.errors import BackboneError, DataError

if TYPE_CHECKING:
    from torchvision.transforms import v2

    from piggyback.model import PiggybackModel

__all__ = ["Preprocess", "eval_transform", "resolve_preprocess", "task_preprocess"]

_KEYS = ("image_size", "resize_size", "mean", "std", "interpolation")
# timm's crop_pct can be a rounded fraction (224 / 232 = 0.96551...): image_size / crop_pct then
# lands a hair below the integer torchvision resizes to, and floor() would lose one pixel.
_ROUNDING_SLACK = 1e-6


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize_size`, centre-crop `image_size`, normalize per channel."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("image_size", "resize_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"preprocessing {name} must be a whole number >= 1, got {value!r}")
        object.__setattr__(self, "mean", _channels("mean", self.mean))
        object.__setattr__(self, "std", _channels("std", self.std))
        if not isinstance(self.interpolation, str):
            raise DataError(f"preprocessing interpolation must be a name, got {self.interpolation}")

    @classmethod
    def from_data_config(
        cls, data_config: Mapping[str, Any], image_size: int | None = None
    ) -> Preprocess:
        """A backbone's data config (`Backbone.data_config`, timm's keys) at `image_size`
        (default: the config's own input size); resized by its crop fraction, as timm does."""
        size = int(image_size or data_config["input_size"][-1])
        crop_pct = data_config.get("crop_pct")
        if crop_pct:
            resize = math.floor(size / float(crop_pct) + _ROUNDING_SLACK)
        else:
            resize = resize_size(size)
        return cls(
            image_size=size,
            resize_size=resize,
            mean=data_config["mean"],
            std=data_config["std"],
            interpolation=str(data_config.get("interpolation") or "bilinear"),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """What a task recorded (`to_dict`). A record without `resize_size` (none written by
        piggyback lacks it, but hand-made ones may) gets the paper's 256/224 ratio."""
        unknown = sorted(set(data) - set(_KEYS))
        missing = [k for k in ("image_size", "mean", "std") if data.get(k) is None]
        if unknown or missing:
            raise DataError(
                f"a task's preprocessing record has unknown keys {unknown} or lacks {missing}: "
                f"expected {', '.join(_KEYS)}"
            )
        size = data["image_size"]
        return cls(
            image_size=size,
            resize_size=data.get("resize_size") or resize_size(size),
            mean=data["mean"],
            std=data["std"],
            interpolation=data.get("interpolation") or "bilinear",
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (lists for mean and std), as stored in task files and export sidecars."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    def resized(self, image_size: int) -> Preprocess:
        """The same field of view at another input size: the resize / crop ratio is kept."""
        if image_size == self.image_size:
            return self
        resize = round(image_size * self.resize_size / self.image_size)
        return Preprocess(image_size, resize, self.mean, self.std, self.interpolation)

    def transform(self, *, train: bool = False) -> v2.Compose:
        """PIL image -> normalized tensor; `train` swaps the centre crop for a random resized
        crop and a horizontal flip (the paper's augmentation)."""
        return build_transforms(
            self.image_size,
            self.mean,
            self.std,
            train=train,
            interpolation=self.interpolation,
            resize=self.resize_size,
        )


def _channels(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    try:
        found = tuple(float(v) for v in values)
    except (TypeError, ValueError) as error:
        raise DataError(f"{name} needs one number per RGB channel, got {values!r}") from error
    if len(found) != 3 or not all(math.isfinite(v) for v in found):
        raise DataError(f"{name} needs one finite value per RGB channel (3), got {list(found)}")
    return found  # type: ignore[return-value]


# -- a task's preprocessing ---------------------------------------------------------------------


def task_preprocess(
    model: PiggybackModel,
    task: str | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocess:
    """The evaluation preprocessing of a task: what it recorded, else its backbone's config.

    Arguments override those: `image_size` keeps the recorded resize / crop ratio (the field of
    view the task was trained on), `mean` and `std` replace the statistics.
    """
    state = model.task(task)
    recorded = state.metadata.preprocess
    if recorded and image_size is not None and not recorded.get("resize_size"):
        found = Preprocess.from_dict({**recorded, "image_size": image_size})
    elif recorded:
        found = Preprocess.from_dict(recorded)
    elif model.backbone_spec:
        found = _backbone_preprocess(model.backbone_spec, image_size)
    else:
        found = _given_preprocess(state.task_name, image_size, mean, std)
    if image_size is not None:
        found = found.resized(int(image_size))
    return Preprocess(
        found.image_size,
        found.resize_size,
        found.mean if mean is None else mean,
        found.std if std is None else std,
        found.interpolation,
    )


def _given_preprocess(
    task: str,
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> Preprocess:
    """An unnamed backbone leaves nothing to look up: the caller must give the statistics
    rather than have us guess ones that silently degrade accuracy."""
    given = {"image_size": image_size, "mean": mean, "std": std}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DataError(
            f"task {task!r} records no preprocessing and its backbone is unnamed (no spec to "
            f"look its data config up): pass {', '.join(missing)} explicitly (the values the "
            "task was trained with)"
        )
    return Preprocess.from_dict(given)


def _backbone_preprocess(spec: Mapping[str, Any], image_size: int | None) -> Preprocess:
    """The backbone's data config, from the model's spec.

    Rebuilt without weights (pretrained=False): the data config belongs to the architecture and
    its pretrained tag, so this needs no download and no weights file.
    """
    from piggyback.backbones import create_backbone_from_spec

    try:
        backbone = create_backbone_from_spec({**spec, "pretrained": False, "weights": None})
    except BackboneError as error:
        raise DataError(
            f"cannot look up the preprocessing of backbone {dict(spec)} ({error}); "
            "pass image_size, mean and std explicitly"
        ) from error
    return Preprocess.from_data_config(backbone.data_config, image_size)


def resolve_preprocess(
    model: PiggybackModel,
    task: str | None = None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """`task_preprocess` as the dict a task records (image_size, resize_size, mean, std,
    interpolation), e.g. for an export's sidecar."""
    found = task_preprocess(model, task, image_size=image_size, mean=mean, std=std)
    return found.to_dict()


def eval_transform(
    model: PiggybackModel,
    task: str | None = None,
    image_size: int | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """PIL image -> normalized tensor, as the task is evaluated (see `task_preprocess`)."""
    found = task_preprocess(model, task, image_size=image_size, mean=mean, std=std)
    return found.transform(train=False)
