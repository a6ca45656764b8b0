"""The classifier slot of a wrapped backbone: it runs the active task's head.

Like PEFT's `ModulesToSaveWrapper`: the wrapper sits where the backbone's head was and keeps the
original. Each task owns its head (`TaskState.head`); the wrapper only points at the active one,
without registering it, so a head's parameters belong to exactly one module tree (its task's).
Heads are modules (not swapped tensors) because a task's head usually has another number of
classes than the backbone's.

Some models declare several heads that their own forward combines: timm's distilled models (DeiT,
PiT, LeViT, EfficientFormer, ...) have `head` and `head_dist` and return their average (separate
outputs only after `set_distilled_training(True)`, in training mode). Every declared head is
replaced, each slot by its own `TaskHeads`, and a task's head is a `HeadGroup` with one head per
slot: the model combines the task's heads exactly as it combines its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from piggyback.errors import TaskError, UnsupportedModelError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the classes of the heads new_head can build


def _slot_key(name: str) -> str:
    return name.replace(".", "/")  # module names cannot contain dots


class HeadGroup(nn.Module):
    """The heads of a model that declares several (a task's, or the backbone's originals), by the
    dotted name of the backbone slot each one sits in."""

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.slots = nn.ModuleDict({_slot_key(name): head for name, head in heads.items()})

    def names(self) -> list[str]:
        return [key.replace("/", ".") for key in self.slots]

    def head(self, name: str) -> nn.Module:
        return self.slots[_slot_key(name)]

    @property
    def num_classes(self) -> int | None:
        """What its heads predict: the declared heads of a model predict the same classes."""
        first = next(iter(self.slots.values()))
        return getattr(first, "out_features", getattr(first, "out_channels", None))

    def forward(self, *args, **kwargs):
        raise TypeError("a HeadGroup is not called: each slot of the backbone runs its own head")


class TaskHeads(nn.Module):
    """Holds the backbone's original head; forwards to the active task's head.

    In a model with several heads, `slot` is the name of this one: it runs that head of the
    active task's HeadGroup.
    """

    def __init__(self, original: nn.Module, slot: str | None = None) -> None:
        super().__init__()
        self.original = original
        self.slot = slot
        self.active: str | None = None
        self._head: list[nn.Module] = []  # a list, so that nn.Module does not register it

    def activate(self, name: str | None, head: nn.Module | None) -> None:
        if isinstance(head, HeadGroup):
            head = head.head(self.slot)
        self.active = name
        self._head = [head] if head is not None else []

    @property
    def current(self) -> nn.Module | None:
        """The active task's head, if a task is active."""
        return self._head[0] if self._head else None

    def forward(self, *args, **kwargs):
        if not self._head:
            raise TaskError("no task is set: call model.set_task(name) first")
        return self._head[0](*args, **kwargs)


def install_task_heads(backbone: nn.Module, names: list[str]) -> None:
    """Put a TaskHeads in the place of each head (named by its slot when there are several)."""
    for name in names:
        try:
            original = backbone.get_submodule(name)
        except AttributeError as error:
            raise UnsupportedModelError(f"head {name!r} is not a module of the backbone") from error
        backbone.set_submodule(name, TaskHeads(original, slot=name if len(names) > 1 else None))


def original_heads(wrappers: dict[str, TaskHeads]) -> nn.Module:
    """The backbone's own head (what the wrappers replaced); a HeadGroup when there are several."""
    originals = {name: wrapper.original for name, wrapper in wrappers.items()}
    return next(iter(originals.values())) if len(originals) == 1 else HeadGroup(originals)


def head_inputs(head: nn.Module) -> int | None:
    """The feature width `head` takes (Linear in_features, conv in_channels; one width shared by
    a HeadGroup's heads): what `PiggybackModel.backbone_features` gives. None when unknown."""
    if isinstance(head, HeadGroup):
        widths = {head_inputs(head.head(name)) for name in head.names()}
        return widths.pop() if len(widths) == 1 else None
    for attribute in ("in_features", "in_channels"):
        value = getattr(head, attribute, None)
        if isinstance(value, int):
            return value
    return None


def heads_by_slot(head: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The module for each head slot: `head`, or each of a HeadGroup's heads."""
    if isinstance(head, HeadGroup):
        return {name: head.head(name) for name in names}
    return {names[0]: head}


@contextmanager
def heads_activated(wrappers: Sequence[TaskHeads], name: str, head: nn.Module) -> Iterator[None]:
    """Run task `name`'s head in every slot for the duration of the block, then restore."""
    previous = [(wrapper.active, wrapper.current) for wrapper in wrappers]
    for wrapper in wrappers:
        wrapper.activate(name, head)
    try:
        yield
    finally:
        for wrapper, (active, held) in zip(wrappers, previous, strict=True):
            wrapper.activate(active, held)


@contextmanager
def modules_in_slots(backbone: nn.Module, modules: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """`backbone` with `modules` in the named head slots for the block (a task's plain heads to
    copy it, nn.Identity for its features); the slots' own modules come back, even on error."""
    current = {name: backbone.get_submodule(name) for name in modules}
    for name, module in modules.items():
        backbone.set_submodule(name, module)
    try:
        yield backbone
    finally:
        for name, module in current.items():
            backbone.set_submodule(name, module)


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
    if isinstance(original, HeadGroup):
        # As timm's reset_classifier: every declared head gets the new number of classes.
        heads = {n: _fresh_head_like(original.head(n), num_classes) for n in original.names()}
        return HeadGroup(heads)
    if isinstance(original, nn.Linear):
        return nn.Linear(original.in_features, num_classes, bias=original.bias is not None)
    for conv in _CONV_TYPES:
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
