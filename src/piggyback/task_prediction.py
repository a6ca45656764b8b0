"""What a Predictor answers for one image and one task, and the class names it answers with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from piggyback.errors import TaskError

__all__ = ["TaskPrediction", "class_names"]


@dataclass(frozen=True)
class TaskPrediction:
    """One image's answer from one task: the `top` classes as (name, probability), best first.

    `routed` is True when the task was chosen by `tasks="auto"`; then `confidence` is the routing
    confidence (see `piggyback.routing`) and `routed_by` the method ("prototypes" or "entropy").
    """

    task: str
    top: list[tuple[str, float]]
    confidence: float | None = None
    routed: bool = False
    routed_by: str | None = None

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.top[0][0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"task", "top": [{"class", "probability"}]}, plus the routing when routed."""
        out: dict[str, Any] = {
            "task": self.task,
            "top": [{"class": name, "probability": prob} for name, prob in self.top],
        }
        if self.routed:
            out["confidence"] = self.confidence
            out["routed_by"] = self.routed_by
        return out


def class_names(names: list[str] | None, count: int | None, task: str) -> list[str] | None:
    """A task's class names for `count` outputs: its own, or "0", "1", ... when it has none."""
    if count is None:
        return names
    if names is None:
        return [str(i) for i in range(count)]
    if len(names) != count:
        raise TaskError(f"task {task!r} has {len(names)} class names for {count} outputs")
    return names
