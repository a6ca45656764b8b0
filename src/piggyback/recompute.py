"""The task's tensors must be in place again when backward recomputes the forward pass.

Why: gradient checkpointing (timm's `set_grad_checkpointing(True)`, `torch.utils.checkpoint` in
any backbone) reruns parts of the forward pass during backward. The swap (`piggyback.swap`) has
put the frozen originals back by then, so without this module the recomputation would use W
instead of W * mask and the score gradients would be silently wrong (measured on timm resnet18
with half the mask off: up to 0.09 absolute difference, 5-10x in L1 norm per layer).

How: the outputs of a forward pass that builds a graph pass through an identity autograd function.
Its backward runs first in the backward pass (the outputs are where backward starts); it swaps the
very tensors of that forward pass (W * mask, with their graph to the scores) back into the slots,
and queues an autograd-engine callback that restores the originals once the whole backward pass
has finished. The cost is one extra swap per backward (~40 us), checkpointing or not.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from piggyback.errors import TaskError
from piggyback.swap import Slot


class BackwardSwap:
    """The slots and tensors of one forward pass, put back in place for its backward pass.

    One per model: while a backward pass holds the slots, a second forward pass of the same task
    shares them (its tensors equal these), and one of another task is refused with a clear error.
    """

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock
        self._active: tuple[str, list[Tensor]] | None = None  # (task, originals)
        self._slots: Sequence[Slot] = ()

    def enter(self, task: str, slots: Sequence[Slot], tensors: Sequence[Tensor]) -> None:
        if self._active is not None:
            if self._active[0] != task:
                raise TaskError(
                    f"one backward pass through forward passes of tasks {self._active[0]!r} "
                    f"and {task!r}: with recomputation (gradient checkpointing) each backward "
                    "pass must cover one task; call backward once per task"
                )
            return
        self._lock.acquire()
        self._slots = slots
        self._active = (task, [slot.store[slot.key] for slot in slots])
        for slot, tensor in zip(slots, tensors, strict=True):
            slot.store[slot.key] = tensor
        torch.autograd.Variable._execution_engine.queue_callback(self.exit)

    def exit(self) -> None:
        if self._active is None:
            return
        for slot, original in zip(self._slots, self._active[1], strict=True):
            slot.store[slot.key] = original
        self._active, self._slots = None, ()
        self._lock.release()


class _ReapplyInBackward(torch.autograd.Function):
    """Identity on the outputs; its backward puts the task's tensors back (see module doc)."""

    @staticmethod
    def forward(ctx, hook: Any, *outputs: Tensor) -> tuple[Tensor, ...]:
        ctx.hook = hook
        return tuple(output.view_as(output) for output in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Any, ...]:
        ctx.hook()
        return (None, *grads)


def reapply_in_backward(
    outputs: Any, swap: BackwardSwap, task: str, slots: Sequence[Slot], tensors: Sequence[Tensor]
) -> Any:
    """`outputs` unchanged in value; their backward first re-applies `tensors` to `slots`."""
    leaves, spec = pytree.tree_flatten(outputs)
    positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
    if not positions or not slots:
        return outputs
    slots, tensors = list(slots), list(tensors)
    passed = _ReapplyInBackward.apply(
        lambda: swap.enter(task, slots, tensors), *(leaves[i] for i in positions)
    )
    for i, tensor in zip(positions, passed, strict=True):
        leaves[i] = tensor
    return pytree.tree_unflatten(leaves, spec)
