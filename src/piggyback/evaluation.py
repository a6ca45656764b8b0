"""Accuracy of a saved task on a dataset split (the `piggyback eval` command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from piggyback.data import ImageDataset, load_splits
from piggyback.errors import DataError
from piggyback.model import PiggybackModel
from piggyback.predict import eval_transform
from piggyback.training.loop import Precision, evaluate
from piggyback.training.run import resolve_device

SPLITS = ("train", "val", "test")


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
