"""Choosing the task for an input nobody labelled with one (`tasks="auto"`).

Method: nearest class prototype. Each task carries the mean pooled feature of each of its classes
under the frozen backbone (no mask applied), computed from its training images at train time and
L2-normalized (at most 32 per task: more classes are merged by k-means, see `route_fit`); an
input goes to the task owning the prototype most cosine-similar to the input's own
frozen-backbone feature. One extra backbone pass per input serves every task.

Why: a task's prediction entropy (as in "Supermasks in Superposition") is a weak signal on real
tasks (69% on a mix of three real tasks; a head trained on its own domain is confidently wrong on
others), and a single mean per task (96% there) blurs tasks whose classes spread widely. Class
means keep that spread; see `benchmarks/serving.py` for the measured figures. Cost: one float16
vector per prototype (2.5 KB for a 1280-feature backbone, at most 80 KB), in the task file.

Tasks saved without prototypes fall back to the lowest normalized prediction entropy, with a
warning and `routed_by="entropy"` on each answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from piggyback.errors import TaskFileError

AUTO = "auto"
PROTOTYPES_KEY = "routing/prototypes"
METHOD = "class-prototypes"
#: Temperature of the softmax over tasks that turns cosine similarities into a confidence: 0.05
#: maps a margin of 0.1 between the best and the second task to 88%, of 0.2 to 98%. (Measured on
#: Flowers-102 / GTSRB with EfficientNet-Lite0, the median margin was 0.5.) A readable score, not
#: a calibrated probability.
TEMPERATURE = 0.05


class NoRoutingProfileWarning(UserWarning):
    """`auto` routing falls back to prediction entropy: some task has no prototypes."""


@dataclass(frozen=True)
class Route:
    """The task chosen for one input, how sure the router is (0..1), and by which method."""

    task: str
    confidence: float
    method: str


@dataclass
class RoutingProfile:
    """What one task carries for routing: L2-normalized class prototypes (classes x features).

    `preprocess`: how the images were prepared when the prototypes were computed; inputs are
    prepared the same way before being compared. `images`: how many images they summarize.
    """

    prototypes: Tensor
    preprocess: dict[str, Any]
    images: int
    method: str = METHOD

    def __post_init__(self) -> None:
        # Kept as stored (float16): half the memory, and routing only ranks similarities.
        self.prototypes = self.prototypes.detach().to("cpu", torch.float16)

    @property
    def nbytes(self) -> int:
        return self.prototypes.numel() * self.prototypes.element_size()

    def scores(self, features: Tensor) -> Tensor:
        """Cosine similarity of each feature row to this task's nearest prototype."""
        prototypes = self.prototypes.to(features.device, torch.float32)
        return (F.normalize(features.float(), dim=1) @ prototypes.T).max(dim=1).values

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "prototypes": self.prototypes.shape[0],
            "features": self.prototypes.shape[1],
            "images": self.images,
            "bytes": self.nbytes,
        }

    # -- task files (see piggyback.serialization) -----------------------------------------------

    def file_tensors(self) -> dict[str, Tensor]:
        return {PROTOTYPES_KEY: self.prototypes}

    def file_metadata(self) -> dict[str, Any]:
        return {"method": self.method, "preprocess": self.preprocess, "images": self.images}


def read_routing_profile(
    path: Path, meta: Any, tensors: Mapping[str, Tensor], features: int | None = None
) -> RoutingProfile | None:
    """The routing profile stored in a task file, or None for files saved without one.

    `features`: the width of the backbone's features (None: unknown); prototypes of another
    width would load and only fail at the first `tasks="auto"`."""
    prototypes = tensors.get(PROTOTYPES_KEY)
    if meta is None and prototypes is None:
        return None
    well_formed = (
        isinstance(meta, dict)
        and meta.get("method") == METHOD
        and isinstance(meta.get("preprocess"), dict)
        and isinstance(meta.get("images"), int)
        and prototypes is not None
        and prototypes.dim() == 2
        and prototypes.is_floating_point()
    )
    if not well_formed:
        found = None if prototypes is None else f"{prototypes.dtype} {tuple(prototypes.shape)}"
        raise TaskFileError(
            f"{path}: malformed routing data (metadata {json.dumps(meta)[:200]}, prototypes "
            f"{found}); expected method {METHOD!r} with a 2-d '{PROTOTYPES_KEY}' tensor. "
            "Compute it again with `piggyback route-fit`"
        )
    if features is not None and prototypes.shape[1] != features:
        raise TaskFileError(
            f"{path}: its routing prototypes have {prototypes.shape[1]} features, but this "
            f"backbone gives {features}: compute them again with `piggyback route-fit`"
        )
    return RoutingProfile(
        prototypes, dict(meta["preprocess"]), int(meta["images"]), str(meta["method"])
    )


# -- routing ------------------------------------------------------------------------------------


def route_by_prototypes(
    features: Mapping[str, Tensor], profiles: Mapping[str, RoutingProfile]
) -> list[Route]:
    """For each input, the task whose nearest class prototype is most similar.

    `features[task]`: the inputs' frozen-backbone features prepared as that task's prototypes
    were (tasks usually share one tensor). Confidence: softmax over tasks at `TEMPERATURE`.
    """
    names = list(profiles)
    scores = torch.stack([profiles[name].scores(features[name]) for name in names], dim=1)
    confidence = (scores / TEMPERATURE).softmax(dim=1)
    best = scores.argmax(dim=1).tolist()
    return [
        Route(names[task], float(confidence[row, task]), "prototypes")
        for row, task in enumerate(best)
    ]


def route_by_entropy(probabilities: Mapping[str, Tensor]) -> list[Route]:
    """For each input, the task whose prediction has the lowest normalized entropy.

    Entropy is divided by log(classes) so tasks with many classes are not penalized; confidence
    is 1 minus the chosen task's normalized entropy. The fallback for tasks without prototypes.
    """
    names = list(probabilities)
    entropies = []
    for name in names:
        probs = probabilities[name].clamp_min(1e-12)
        classes = probs.shape[1]
        entropy = -(probs * probs.log()).sum(dim=1)
        entropies.append(entropy / math.log(classes) if classes > 1 else torch.zeros_like(entropy))
    stacked = torch.stack(entropies, dim=1)
    best = stacked.argmin(dim=1).tolist()
    return [
        Route(names[task], float(1 - stacked[row, task]), "entropy")
        for row, task in enumerate(best)
    ]
