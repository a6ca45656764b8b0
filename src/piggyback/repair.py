"""Task files that a model directory's index does not list, and putting them back in it.

A task is saved as its file first and its index entry second, so a writer killed in between (or
two writers racing, before the index was locked) leaves a file that `from_pretrained` does not
know and that `piggyback train` still refuses to overwrite. `unindexed_task_files` finds such
files (`piggyback info` lists them); `repair_index` checks each one and adds it to the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from piggyback.errors import PiggybackError, TaskFileError
from piggyback.fileio import write_json_atomic
from piggyback.model_dir import CONFIG_NAME, TASKS_DIR, index_lock, read_model_config, sealed
from piggyback.taskfile import read_task_file
from piggyback.tasks import check_task_name

__all__ = ["repair_index", "unindexed_task_files"]


def unindexed_task_files(directory: str | Path, config: dict[str, Any] | None = None) -> list[Path]:
    """Files `directory/tasks/*.safetensors` that no entry of the index points to, sorted.

    `config`: the index already read (`read_model_config`). Hidden files (temporary files of a
    write in progress) are not task files.
    """
    directory = Path(directory)
    config = config or read_model_config(directory)
    listed = {(directory / entry["file"]).resolve() for entry in config["tasks"].values()}
    return sorted(
        path
        for path in (directory / TASKS_DIR).glob("*.safetensors")
        if not path.name.startswith(".") and path.resolve() not in listed
    )


def repair_index(directory: str | Path) -> tuple[list[str], list[str]]:
    """Add every intact unindexed task file of `directory` to its index.

    Returns the names added and, for each file left out, why. A file is added only if it passes
    the checks of loading (checksum, format) and belongs to this directory: the same backbone
    fingerprint and mask settings, and a valid task name the index does not have yet.
    """
    directory = Path(directory)
    added: list[str] = []
    refused: list[str] = []
    with index_lock(directory):  # the index cannot change between reading and rewriting it
        config = read_model_config(directory)
        for path in unindexed_task_files(directory, config):
            try:
                name, entry = _entry_for(path, directory, config)
            except PiggybackError as error:
                refused.append(str(error))
                continue
            config["tasks"][name] = entry
            added.append(name)
        if added:
            write_json_atomic(directory / CONFIG_NAME, sealed(config))
    return added, refused


def _entry_for(path: Path, directory: Path, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The index entry of the task file at `path`, or a TaskFileError saying why it has none."""
    meta, _ = read_task_file(path)
    name = check_task_name(meta.get("task"))
    if name in config["tasks"]:
        raise TaskFileError(
            f"{path} holds task {name!r}, which the index lists with another file "
            f"({config['tasks'][name]['file']}): remove one of the two"
        )
    if meta.get("backbone_fingerprint") != config["backbone"]["fingerprint"]:
        raise TaskFileError(f"{path} was made for another backbone than {directory}'s")
    settings = config["config"]
    if meta.get("mask_kind") is not None and (  # a method with masks
        meta.get("mask_kind") != settings.get("mask_kind")
        or meta.get("threshold") != settings.get("threshold")
    ):
        raise TaskFileError(f"{path} holds other mask settings than {directory}'s tasks")
    entry = {
        "file": path.relative_to(directory).as_posix(),
        "method": meta.get("method"),
        "num_classes": meta.get("num_classes"),
    }
    return name, entry
