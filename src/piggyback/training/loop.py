"""One epoch of training.

Kept free of files and logging so that the run orchestration (`run.py`), the benchmarks and the
tests can all drive the same code. Evaluation (`piggyback.evaluation.evaluate`) and the precision
settings (`piggyback.device.Precision`) live on the inference side and are re-exported here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from piggyback.device import Precision
from piggyback.errors import PiggybackError
from piggyback.evaluation import evaluate

__all__ = ["EpochStats", "NonFiniteLossError", "Precision", "evaluate", "train_one_epoch"]


class NonFiniteLossError(PiggybackError, FloatingPointError):
    """The training loss became NaN or infinite."""


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
