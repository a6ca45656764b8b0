"""Accuracy of a task on a dataset split: the metrics of one pass, and the `piggyback eval` command.

`evaluate` is the one evaluation loop: training validates and tests with it, `piggyback eval`
measures a saved task with it, so both report the same numbers for the same task and images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from piggyback.data import ImageDataset, load_splits
from piggyback.device import Precision, resolve_device
from piggyback.errors import DataError
from piggyback.model import PiggybackModel
from piggyback.preprocess import eval_transform

SPLITS = ("train", "val", "test")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    precision: Precision,
    *,
    progress: bool = True,
    description: str = "eval",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Top-1 / top-5 accuracy (%), mean loss and per-class top-1 accuracy over `loader`.

    `reduce` sums the counts over processes when each evaluates a shard of the data.
    """
    model.eval()
    device = precision.device
    per_class_correct = torch.zeros(num_classes, dtype=torch.long)
    per_class_total = torch.zeros(num_classes, dtype=torch.long)
    top5_correct, total_loss = 0, 0.0
    k = min(5, num_classes)
    for images, labels in tqdm(loader, desc=description, leave=False, disable=not progress):
        with precision.autocast():
            logits = model(images.to(device)).float().cpu()
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(k, dim=1).indices
        hit1 = top[:, 0] == labels
        top5_correct += int((top == labels[:, None]).any(1).sum())
        per_class_total += torch.bincount(labels, minlength=num_classes)
        per_class_correct += torch.bincount(labels[hit1], minlength=num_classes)
    if reduce is not None:
        counts = torch.cat([per_class_correct, per_class_total]).double()
        extra = torch.tensor([top5_correct, total_loss], dtype=torch.float64)
        counts, extra = reduce(counts.to(device)).cpu(), reduce(extra.to(device)).cpu()
        per_class_correct, per_class_total = counts.long().split(num_classes)
        top5_correct, total_loss = int(extra[0]), float(extra[1])
    count = int(per_class_total.sum())
    present = per_class_total > 0
    per_class = torch.where(present, 100 * per_class_correct / per_class_total.clamp(min=1), 0)
    return {
        "top1": 100 * int(per_class_correct.sum()) / max(count, 1),
        "top5": 100 * top5_correct / max(count, 1),
        "loss": total_loss / max(count, 1),
        "images": count,
        "mean_per_class": float(per_class[present].mean()) if present.any() else 0.0,
        "per_class": [float(a) if p else None for a, p in zip(per_class, present, strict=True)],
    }


def evaluate_task(
    model_dir: str | Path,
    task: str,
    data: str | Path,
    *,
    split: str = "test",
    data_format: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    device: str = "auto",
    precision: str = "32",
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy of `task` from `model_dir` on a split of `data`.

    A held-out validation split is rebuilt with the seed and fraction the task was trained with,
    so "val" means the same images as during training.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    model = PiggybackModel.from_pretrained(model_dir, tasks=[task])
    model.set_task(task)
    state = model.task(task)
    training = state.metadata.training or {}
    splits = load_splits(
        data,
        data_format,
        val_fraction=training.get("val_fraction", 0.1),
        seed=training.get("seed", 0),
    )
    samples = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    if not samples:
        raise DataError(f"{data} has no {split} split")
    outputs = _head_outputs(model, task)
    if outputs != splits.num_classes:
        raise DataError(
            f"{data} has {splits.num_classes} classes, but task {task!r} predicts {outputs}: "
            "evaluate it on the dataset it was trained for"
        )
    if state.class_names is not None and list(state.class_names) != list(splits.class_names):
        raise DataError(
            f"the classes of {data} ({len(splits.class_names)}: {splits.class_names[:3]}...) are "
            f"not those task {task!r} was trained on ({len(state.class_names)}: "
            f"{state.class_names[:3]}...)"
        )
    dataset = ImageDataset(samples, eval_transform(model, task), class_names=splits.class_names)
    loader = DataLoader(dataset, batch_size, num_workers=workers)
    target = resolve_device(device)
    model.to(target)
    metrics = evaluate(
        model, loader, splits.num_classes, Precision(precision, target), progress=progress
    )
    metrics["per_class"] = dict(zip(splits.class_names, metrics["per_class"], strict=True))
    return {"task": task, "split": split, "data": str(data), **metrics}


def _head_outputs(model: PiggybackModel, task: str) -> int:
    """Number of classes a task's head predicts (its last weight's first dimension)."""
    weights = [p for n, p in model.task(task).head.named_parameters() if n.endswith("weight")]
    return int(weights[-1].shape[0])


def format_evaluation(result: dict[str, Any], *, per_class: bool = True) -> str:
    """A readable report: the headline numbers, then per-class accuracy from worst to best."""
    lines = [
        f"task {result['task']} on {result['split']} of {result['data']}: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"mean per-class {result['mean_per_class']:.2f}%  ({result['images']} images)"
    ]
    if per_class:
        scored = [(acc, name) for name, acc in result["per_class"].items() if acc is not None]
        width = max((len(name) for _, name in scored), default=0)
        lines += [f"  {name:<{width}}  {acc:6.2f}%" for acc, name in sorted(scored)]
    return "\n".join(lines)
