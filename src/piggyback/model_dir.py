"""The model directory: an index (`piggyback_config.json`) and one task file per task.

The index records the mask settings every task shares, the backbone (how to rebuild it and its
fingerprint) and each task's file. From version 2 on it carries a checksum over its canonical
JSON, so a damaged index is refused instead of read. The model itself is built in
`PiggybackModel.from_pretrained`; this module only reads and writes the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import piggyback
from piggyback.errors import TaskFileError
from piggyback.fileio import check_format, content_checksum, write_json_atomic
from piggyback.taskfile import check_backbone, save_task

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel

MODEL_FORMAT = "piggyback-model"
MODEL_FORMAT_VERSION = 2
CHECKED_FROM = 2  # the first version whose index carries a checksum
CONFIG_NAME = "piggyback_config.json"
TASKS_DIR = "tasks"


def task_file(directory: Path, name: str) -> Path:
    return directory / TASKS_DIR / f"{name}.safetensors"


def model_index(model: PiggybackModel, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    index = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "piggyback_version": piggyback.__version__,
        "config": model.config.to_dict(),
        "backbone": {
            "spec": model.backbone_spec,
            "fingerprint": model.fingerprint,
            "head": model.head_name,
            "num_masked": model.num_masked,
        },
        "tasks": tasks,
    }
    index["checksum"] = content_checksum(index)
    return index


def read_model_config(directory: Path) -> dict[str, Any]:
    """The checked index of a model directory."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise TaskFileError(f"{directory} is not a piggyback model directory: no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise TaskFileError(f"{path} is not valid JSON ({error})") from error
    check_format(path, data, MODEL_FORMAT, MODEL_FORMAT_VERSION)
    if data["format_version"] >= CHECKED_FROM and data.get("checksum") != content_checksum(data):
        raise TaskFileError(
            f"{path} is corrupted: its contents do not match the checksum it records; "
            "restore it from a copy, or save the tasks into a new directory"
        )
    backbone, tasks = data.get("backbone"), data.get("tasks")
    well_formed = (
        isinstance(data.get("config"), dict)
        and isinstance(backbone, dict)
        and isinstance(backbone.get("fingerprint"), str)
        and isinstance(tasks, dict)
        and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in tasks.values())
    )
    if not well_formed:
        raise TaskFileError(
            f"{path} is malformed: expected 'config', 'backbone' (with 'fingerprint') and "
            "'tasks' (each with a 'file') entries"
        )
    return data


def save_pretrained(model: PiggybackModel, directory: Path, tasks: list[str] | None) -> Path:
    """Write task files, then the index that lists them; tasks saved earlier are kept.

    Each file is written atomically, but the index is read, updated and rewritten: two processes
    saving into one directory at the same moment can lose one of their index entries.
    """
    names = model.tasks if tasks is None else tasks
    index: dict[str, dict[str, Any]] = {}
    if (directory / CONFIG_NAME).exists():
        existing = read_model_config(directory)
        check_backbone(model, directory, existing["backbone"]["fingerprint"])
        if existing["config"] != model.config.to_dict():
            raise TaskFileError(
                f"{directory} was saved with config {existing['config']}, this model has "
                f"{model.config.to_dict()}: save into another directory"
            )
        index = {n: e for n, e in existing["tasks"].items() if (directory / e["file"]).is_file()}
    for name in names:
        path = save_task(model, name, task_file(directory, name))
        state = model.task(name)
        index[name] = {
            "file": str(path.relative_to(directory)),
            "method": state.method_name,
            "num_classes": state.num_classes,
        }
    write_json_atomic(directory / CONFIG_NAME, model_index(model, index))
    return directory
