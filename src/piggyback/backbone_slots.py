"""The shared backbone's swap points: where each task tensor goes, and who may swap now.

A `PiggybackModel` owns one `BackboneSlots`. Every task puts its tensors into the same backbone
(`piggyback.swap`), so this object keeps together what must be consistent across all of them:

- the `Slot` of each swapped name, resolved once (resolving per forward pass costs time);
- one re-entrant lock: two threads swapping into one backbone would mix their tasks' weights, so
  a forward pass, a task replacement or a predictor's cache lookup hold it;
- the frozen originals while a task is applied: a forward pass run inside `task_applied` computes
  W * mask from W, not from the W * mask that the outer swap put in the slot;
- the swap that backward replays for gradient checkpointing (`piggyback.recompute`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn

from piggyback.recompute import BackwardSwap
from piggyback.swap import Slot, swapped


class BackboneSlots:
    """The slots of one backbone, the lock that serialises swaps, and the originals in use."""

    def __init__(self, backbone: nn.Module) -> None:
        self.backbone = backbone
        self.lock = threading.RLock()
        self.backward_swap = BackwardSwap(self.lock)
        self._slots: dict[str, Slot] = {}
        self._applied: list[dict[str, Tensor]] = []  # originals of the swaps now active

    def slot(self, name: str) -> Slot:
        """The slot of the backbone parameter or buffer `name` (resolved once, then kept)."""
        if name not in self._slots:
            self._slots[name] = Slot.resolve(self.backbone, name)
        return self._slots[name]

    def slots(self, names: Sequence[str]) -> list[Slot]:
        return [self.slot(name) for name in names]

    @contextmanager
    def swapped(self, slots: Sequence[Slot], tensors: Sequence[Tensor]) -> Iterator[None]:
        """`swap.swapped` under the lock, remembering the originals for `original`."""
        with self.lock:
            self._applied.append({slot.name: slot.get() for slot in slots})
            try:
                with swapped(slots, tensors):
                    yield
            finally:
                self._applied.pop()

    def original(self, name: str) -> Tensor:
        """The frozen backbone tensor `name`, also while a task's tensors are in its slot."""
        for originals in self._applied:  # the outermost swap holds the frozen originals
            if name in originals:
                return originals[name]
        return self.slot(name).get()

    def forget(self) -> None:
        """Drop the resolved slots (the backbone's modules are being handed back or replaced)."""
        self._slots = {}
