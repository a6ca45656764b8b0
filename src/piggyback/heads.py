"""The classifier slot of a wrapped backbone: it runs the active task's head.

Like PEFT's `ModulesToSaveWrapper`: the wrapper sits where the backbone's head was and keeps the
original. Each task owns its head (`TaskState.head`); the wrapper only points at the active one,
without registering it, so a head's parameters belong to exactly one module tree (its task's).
Heads are modules (not swapped tensors) because a task's head usually has another number of
classes than the backbone's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from piggyback.errors import TaskError, UnsupportedModelError


class TaskHeads(nn.Module):
    """Holds the backbone's original head; forwards to the active task's head."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.active: str | None = None
        self._head: list[nn.Module] = []  # a list, so that nn.Module does not register it

    def activate(self, name: str | None, head: nn.Module | None) -> None:
        self.active = name
        self._head = [head] if head is not None else []

    def forward(self, *args, **kwargs):
        if not self._head:
            raise TaskError("no task is set: call model.set_task(name) first")
        return self._head[0](*args, **kwargs)


def _first_param(module: nn.Module) -> torch.Tensor | None:
    return next(iter(module.parameters()), None)


def new_head(original: nn.Module, num_classes: int | None, seed: int | None) -> nn.Module:
    """A trainable head for a new task: a copy of `original`, or a fresh one with `num_classes`.

    A seed makes the initialisation independent of how many tasks were added before.
    """
    if num_classes is None:
        head = copy.deepcopy(original)
    else:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            head = _fresh_head_like(original, num_classes)
        reference = _first_param(original)
        if reference is not None:
            head = head.to(device=reference.device, dtype=reference.dtype)
    head.requires_grad_(True)
    return head


def _fresh_head_like(original: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(original, nn.Linear):
        return nn.Linear(original.in_features, num_classes, bias=original.bias is not None)
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if not isinstance(original, conv):
            continue
        # The plain base class: subclasses (e.g. timm's Conv2dSame) may take other arguments.
        return conv(
            original.in_channels,
            num_classes,
            kernel_size=original.kernel_size,
            stride=original.stride,
            padding=original.padding,
            bias=original.bias is not None,
        )
    raise UnsupportedModelError(
        f"cannot build a new {type(original).__name__} head with {num_classes} classes; "
        "name an nn.Linear or nn.Conv head with PiggybackConfig(head=...)"
    )
