"""One epoch of training and one pass of evaluation.

Kept free of files and logging so that the run orchestration (`run.py`), the benchmarks and the
tests can all drive the same code.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from piggyback.errors import PiggybackError


class NonFiniteLossError(PiggybackError, FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class Precision:
    """Autocast and gradient scaling for `--precision 32 | bf16 | 16-mixed`."""

    name: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def scaler(self) -> torch.amp.GradScaler:
        # Only float16 needs loss scaling; bf16 has float32's range.
        return torch.amp.GradScaler(self.device.type, enabled=self.name == "16-mixed")


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    *,
    max_batches: int | None = None,
    progress: bool = True,
    description: str = "train",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochStats:
    """Cross-entropy training over `loader`; stops the run on a NaN or infinite loss.

    With several processes, `reduce` sums a non-finite flag over them, so all stop together
    instead of leaving the others waiting in a gradient all-reduce.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    batches = tqdm(loader, desc=description, leave=False, disable=not progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(batches):
        if max_batches is not None and step >= max_batches:
            break
        images = images.to(precision.device, non_blocking=True)
        labels = labels.to(precision.device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        value = loss.item()
        bad = not math.isfinite(value)
        if reduce is not None:
            bad = bool(reduce(torch.tensor([float(bad)], device=precision.device)).item())
        if bad:
            raise NonFiniteLossError(f"the loss is {value} at step {step} of {description}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += value * labels.numel()
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.numel()
        batches.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    seconds = time.perf_counter() - start
    return EpochStats(total_loss / max(seen, 1), 100 * correct / max(seen, 1), seen, seconds)


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
