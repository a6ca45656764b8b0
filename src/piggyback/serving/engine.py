"""What the server needs from a model: task names, their descriptions, and batched prediction.

The HTTP layer and the dynamic batcher only talk to this small protocol, so they can be tested
and reused (uvicorn, Ray Serve) whatever holds the backbone. `ModelEngine` implements it over a
`PiggybackModel` directory; it is the interim engine until the many-task `Predictor` lands, whose
`tasks`, `task_description` and `predict` have the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from piggyback.errors import TaskError

__all__ = ["AUTO", "Answer", "Engine", "ModelEngine"]

#: The task name that asks the engine to pick the task itself.
AUTO = "auto"


@dataclass(frozen=True)
class Answer:
    """The top classes of one image for one task; `routed` when the engine chose the task."""

    task: str
    top: list[tuple[str, float]]
    confidence: float | None = None
    routed: bool = False


class Engine(Protocol):
    """Batched prediction over a fixed set of tasks (one backbone, many tasks)."""

    @property
    def tasks(self) -> list[str]: ...

    def task_description(self, name: str) -> dict[str, Any]: ...

    def predict(
        self, images: Sequence[Image.Image], tasks: Sequence[str], *, top_k: int
    ) -> list[Answer]:
        """One answer per image, `tasks[i]` (a name or `AUTO`) for `images[i]`."""
        ...


class ModelEngine:
    """`Engine` over a saved model directory: mixed-task batches run grouped by task.

    "auto" runs every task and answers with the one most confident in its top class (a simple
    router; the Predictor's replaces it). Not thread-safe: the batcher calls it from one thread.
    """

    def __init__(self, directory: str | Path, *, device: str | torch.device = "cpu") -> None:
        from piggyback.model import PiggybackModel
        from piggyback.predict import eval_transform

        self.model = PiggybackModel.from_pretrained(directory).to(device).eval()
        self.device = torch.device(device)
        self._transforms = {name: eval_transform(self.model, name) for name in self.model.tasks}

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    def task_description(self, name: str) -> dict[str, Any]:
        state = self.model.task(name)
        classes = state.class_names or [str(i) for i in range(self._num_classes(name))]
        return {
            "name": name,
            "num_classes": len(classes),
            "classes": classes,
            "metadata": {k: v for k, v in state.info.items() if k in ("preprocess", "results")},
        }

    def _num_classes(self, name: str) -> int:
        head = self.model.heads.heads[name]
        return int(head.out_features) if hasattr(head, "out_features") else 0

    def predict(
        self, images: Sequence[Image.Image], tasks: Sequence[str], *, top_k: int
    ) -> list[Answer]:
        for task in set(tasks) - {AUTO}:
            self.model.task(task)  # raises TaskError naming the known tasks
        answers: dict[int, Answer] = {}
        wanted = sorted(set(self.tasks) if AUTO in tasks else set(tasks))
        with torch.inference_mode():
            for name in wanted:
                rows = [i for i, t in enumerate(tasks) if t in (name, AUTO)]
                for i, answer in zip(
                    rows, self._run(name, [images[i] for i in rows], top_k), strict=True
                ):
                    if tasks[i] != AUTO:
                        answers[i] = answer
                    elif i not in answers or answer.top[0][1] > answers[i].top[0][1]:
                        answers[i] = Answer(name, answer.top, answer.top[0][1], routed=True)
        return [answers[i] for i in range(len(images))]

    def _run(self, task: str, images: list[Image.Image], top_k: int) -> list[Answer]:
        if not images:
            return []
        if task not in self._transforms:
            raise TaskError(f"unknown task {task!r}; this model has tasks {self.tasks}")
        batch = torch.stack([self._transforms[task](image) for image in images]).to(self.device)
        self.model.set_task(task)
        probs = self.model(batch).float().softmax(dim=1).cpu()
        classes = self.task_description(task)["classes"]
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            Answer(task, [(classes[c], p) for c, p in zip(row_i, row_v, strict=True)])
            for row_i, row_v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
