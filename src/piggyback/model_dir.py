"""The model directory: an index (`piggyback_config.json`) and one task file per task.

The index records the mask settings every task shares, the backbone (how to rebuild it and its
fingerprint) and each task's file. From version 2 on it carries a checksum over its canonical
JSON, so a damaged index is refused instead of read. The model itself is built in
`PiggybackModel.from_pretrained`; this module only reads and writes the directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

import piggyback
from piggyback.config import PiggybackConfig
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
LOCK_NAME = ".piggyback.lock"
LOCK_TIMEOUT_S = 600  # a save takes seconds; minutes mean the other writer is stuck


def task_file(directory: Path, name: str) -> Path:
    return directory / TASKS_DIR / f"{name}.safetensors"


def model_index(model: PiggybackModel, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return sealed(
        {
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
    )


def sealed(index: dict[str, Any]) -> dict[str, Any]:
    """`index` at the current format version, with the checksum of its contents."""
    index = {**index, "format_version": MODEL_FORMAT_VERSION}
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
    _check_index_values(path, data)
    # Checked as the code checks it, and read as the code reads it: one string is one entry.
    data["config"] = index_config(directory, data).to_dict()
    return data


def _name(value: Any) -> bool:
    return value is None or isinstance(value, str)


#: Backbone values read by type: (section, key, check, what is expected). The 'config' section
#: is checked by PiggybackConfig itself (`index_config`).
_INDEX_VALUES = (
    ("backbone", "spec", lambda v: v is None or isinstance(v, dict), "an object or null"),
    ("backbone", "head", _name, "a string or null"),
    ("backbone", "num_masked", lambda v: type(v) is int and v >= 0, "a whole number >= 0"),
)


def _check_index_values(path: Path, data: dict[str, Any]) -> None:
    """Refuse values of the wrong type, which would escape as tracebacks from `describe` or
    when the model is built (a version-1 index has no checksum: a hand edit is enough)."""
    for section, key, valid, expected in _INDEX_VALUES:
        value = data[section].get(key)
        if not valid(value):
            raise TaskFileError(
                f"{path}: '{section}.{key}' must be {expected}, found {repr(value)[:80]}; the "
                "index is damaged: restore it from a copy or save the tasks into a new directory"
            )


def indexed_task_path(directory: Path, name: str, entry: dict[str, Any]) -> Path:
    """The file of index entry `name`, refused unless it lies inside `directory`.

    An index is data, not code: an entry such as `../../other/tasks/x.safetensors`, an absolute
    path or a symbolic link leading out of the directory would make a model load files it does
    not own.
    """
    file = entry["file"]
    where = f"{directory / CONFIG_NAME}: task {name!r} points to {file!r}"
    relative = PurePosixPath(file.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(file).drive or ".." in relative.parts:
        raise TaskFileError(
            f"{where}, outside the model directory (absolute or with '..'); "
            "task files must lie inside it"
        )
    path = directory / relative
    if not path.resolve().is_relative_to(directory.resolve()):
        raise TaskFileError(
            f"{where}, a link out of the model directory; task files must lie inside it"
        )
    return path


def index_config(directory: Path, index: dict[str, Any]) -> PiggybackConfig:
    """The mask settings an index records, refused with a TaskFileError if invalid."""
    try:
        return PiggybackConfig.from_dict(index["config"])
    except (TypeError, ValueError) as error:
        raise TaskFileError(f"{directory / CONFIG_NAME}: invalid 'config' ({error})") from error


@contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s writer lock: one read-modify-write of its index at a time.

    Without it, two processes adding tasks at once both read the old index and the second rename
    drops the first one's entry. An OS lock (flock / LockFileEx, through `filelock`), released by
    the system if its holder dies, so a killed writer never leaves the directory locked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_NAME, timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as error:
        raise TaskFileError(
            f"another process has been writing to {directory} for {LOCK_TIMEOUT_S} s (it holds "
            f"{directory / LOCK_NAME}): let it finish, or stop it"
        ) from error
    try:
        yield
    finally:
        lock.release()


def save_pretrained(
    model: PiggybackModel,
    directory: Path,
    tasks: list[str] | None,
    *,
    codec: str | None = None,
    head_dtype: str | None = None,
) -> Path:
    """Write task files, then the index that lists them; tasks saved earlier are kept.

    The whole update holds the directory's lock (`index_lock`), so processes saving tasks into one
    directory at the same time all keep their index entries.
    """
    with index_lock(directory):
        return _save_pretrained_locked(model, directory, tasks, codec, head_dtype)


def _save_pretrained_locked(
    model: PiggybackModel,
    directory: Path,
    tasks: list[str] | None,
    codec: str | None,
    head_dtype: str | None,
) -> Path:
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
        path = save_task(
            model, name, task_file(directory, name), codec=codec, head_dtype=head_dtype
        )
        state = model.task(name)
        index[name] = {
            "file": path.relative_to(directory).as_posix(),
            "method": state.method_name,
            "num_classes": state.num_classes,
        }
    write_json_atomic(directory / CONFIG_NAME, model_index(model, index))
    return directory
