"""End-of-epoch checkpoints: everything needed to resume a run exactly, in one safetensors file.

Tensors (the task's trainable state, its head, the optimizer's moments, and the best epoch's task
so far) are safetensors; the rest (epoch, history, optimizer hyper-parameters, schedule and loss
scaler state) is JSON in the file's metadata, so resuming never unpickles anything. Written
atomically: an interruption leaves the previous checkpoint intact. Random number generators are
not saved: each epoch reseeds them from (seed, epoch), which is what makes a resumed run
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from piggyback.errors import PiggybackError
from piggyback.fileio import content_checksum, read_checked_safetensors, write_atomic
from piggyback.model import PiggybackModel
from piggyback.taskfile import check_backbone

FORMAT = "piggyback-checkpoint"
#: 1: checksum over tensors, head saved apart ("head/"); 2: checksum over metadata too, the head
#: saved with its task ("task/head.").
VERSION = 2
CHECKED_FROM = 2


class CheckpointMismatchError(PiggybackError, ValueError):
    """A checkpoint's tensors or state do not fit the run being resumed."""


@dataclass
class RunState:
    """Where a run stands after `epoch` completed epochs."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # metrics of the best epoch on validation
    best_task: tuple[dict[str, Any], dict[str, Tensor]] | None = None  # its task file contents


def _optimizer_parts(optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Tensor]]:
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entries in state["state"].items():
        plain[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                plain[str(index)][key] = value
    return {"param_groups": state["param_groups"], "state": plain}, tensors


def _optimizer_state(skeleton: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in skeleton["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": skeleton["param_groups"]}


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}/{k}": v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}


def save_checkpoint(
    path: Path,
    model: PiggybackModel,
    task: str,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
    run: RunState,
    config: dict[str, Any],
) -> Path:
    """Write the checkpoint of `run` atomically."""
    optim_meta, optim_tensors = _optimizer_parts(optimizer)
    tensors = {
        **_prefixed("task", model.task(task).state_dict()),
        **_prefixed("optim", {k[len("optim/") :]: v for k, v in optim_tensors.items()}),
    }
    best_meta = None
    if run.best_task is not None:
        best_meta, best_tensors = run.best_task
        tensors.update(_prefixed("best", best_tensors))
    meta = {
        "format": FORMAT,
        "format_version": VERSION,
        "task": task,
        "backbone_fingerprint": model.fingerprint,
        "epoch": run.epoch,
        "history": run.history,
        "best": run.best,
        "best_task_meta": best_meta,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "config": config,
    }
    meta["checksum"] = content_checksum(meta, tensors)
    metadata = {"piggyback": json.dumps(meta)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


#: A checkpoint as read: its JSON metadata and its tensors.
Checkpoint = tuple[dict[str, Any], dict[str, Tensor]]


def read_checkpoint(path: Path) -> Checkpoint:
    """Metadata and tensors of a checkpoint, refusing damaged or foreign files."""
    return read_checked_safetensors(path, FORMAT, VERSION, "checkpoint", checked_from=CHECKED_FROM)


def restore_checkpoint(
    meta: dict[str, Any],
    tensors: dict[str, Tensor],
    model: PiggybackModel,
    optimizer: Optimizer,
    scheduler: LRScheduler,
    scaler: torch.amp.GradScaler,
) -> RunState:
    """Put a checkpoint's state back into freshly built objects; returns where the run stands.

    Refuses a checkpoint of another backbone or one that does not fit the run (e.g. the dataset
    now has another number of classes) with a RunError that says so.
    """
    check_backbone(model, Path("the checkpoint"), meta.get("backbone_fingerprint"))
    task = meta["task"]
    try:
        own = _strip("task", tensors)
        own.update({f"head.{k}": v for k, v in _strip("head", tensors).items()})  # version 1
        model.task(task).load_state_dict(own)
        # load_state_dict moves the moments to each parameter's device (Adam's step stays on CPU).
        optim = {f"optim/{k}": v for k, v in _strip("optim", tensors).items()}
        optimizer.load_state_dict(_optimizer_state(meta["optimizer"], optim))
        scheduler.load_state_dict(meta["scheduler"])
        scaler.load_state_dict(meta["scaler"])
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit this run (was the data or the model changed?): {error}"
        ) from error
    best_tensors = _strip("best", tensors)
    best_task = (meta["best_task_meta"], best_tensors) if meta["best_task_meta"] else None
    return RunState(meta["epoch"], meta["history"], meta["best"], best_task)
