"""A PiggybackModel's files: the save / load methods users call on the model.

A mixin, as Hugging Face's `ModelHubMixin` is: `model.py` stays about tasks and forward passes,
and the formats (`taskfile`: one task; `model_dir`: a directory of tasks with its index) take the
model as an argument and never import its class, so there is no import cycle between the model and
its files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from piggyback import model_dir, taskfile
from piggyback.errors import TaskError, TaskFileError

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel


class ModelFiles:
    """`save_task` / `load_task` / `save_pretrained` / `from_pretrained` for `PiggybackModel`."""

    def save_task(
        self: PiggybackModel,
        path: str | Path,
        task: str | None = None,
        *,
        codec: str | None = None,
        head_dtype: str | None = None,
    ) -> Path:
        """Write one task to a safetensors file (coded masks, head, norms, metadata).

        codec: how masks are stored ("zstd": entropy-coded; "packed": 1 or 2 bits per weight);
            None: as the file the task was loaded from stored them, else "zstd" unless packed
            is smaller (tiny models).
        head_dtype: "float16" or "bfloat16" stores the head and task norms compactly (lossy);
            None: as the task's file stored them, else as they are ("float32" widens them).
        """
        name = self.task(task).task_name
        return taskfile.save_task(self, name, Path(path), codec=codec, head_dtype=head_dtype)

    def load_task(
        self: PiggybackModel,
        path: str | Path,
        name: str | None = None,
        *,
        check_fingerprint: bool = True,
        replace: bool = False,
    ) -> str:
        """Add the task stored in `path` as `name` (default: its saved name), frozen; returns
        the name. `unfreeze_task(name)` makes it trainable again. `replace=True` replaces a task
        of that name, once the file has been checked completely."""
        return taskfile.load_task(
            self, Path(path), name=name, check_fingerprint=check_fingerprint, replace=replace
        )

    def save_pretrained(
        self: PiggybackModel,
        directory: str | Path,
        tasks: list[str] | None = None,
        *,
        codec: str | None = None,
        head_dtype: str | None = None,
    ) -> Path:
        """Write the model config and one file per task into `directory` (like PEFT); `codec`
        and `head_dtype` as for `save_task`."""
        return model_dir.save_pretrained(
            self, Path(directory), tasks, codec=codec, head_dtype=head_dtype
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: nn.Module | None = None,
        *,
        tasks: list[str] | None = None,
        check_fingerprint: bool = True,
    ) -> PiggybackModel:
        """Rebuild a saved model: onto `backbone`, or the one its config describes."""
        directory = Path(directory)
        data = model_dir.read_model_config(directory)
        config = model_dir.index_config(directory, data)
        spec = data["backbone"].get("spec") or {}
        if backbone is None:
            if not spec:
                raise TaskFileError(f"{directory} does not say how to build its backbone; pass one")
            from piggyback.backbones import create_backbone_from_spec  # imports timm: lazily

            backbone = create_backbone_from_spec(spec).model
        model = cls(backbone, config, backbone_spec=spec)
        if check_fingerprint:
            taskfile.check_backbone(model, directory, data["backbone"]["fingerprint"], spec)
        names = list(data["tasks"]) if tasks is None else tasks
        for name in names:
            if name not in data["tasks"]:
                raise TaskError(f"{directory} has no task {name!r}; it has {list(data['tasks'])}")
            path = model_dir.indexed_task_path(directory, name, data["tasks"][name])
            taskfile.load_task(
                model, path, name=name, check_fingerprint=check_fingerprint, expected_name=name
            )
        return model
