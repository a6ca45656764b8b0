"""What one task owns besides its head: mask scores (or packed masks), norms, or full weights.

Three methods share this container so that evaluation, export and storage treat them alike:
- "piggyback": a mask per masked weight; real-valued scores while it can be trained, or packed
  1-2 bit masks once loaded from a file (1 bit per weight in memory too).
- "classifier": nothing but the head (the paper's classifier-only baseline).
- "finetune": a full copy of every backbone tensor (the paper's fine-tuning baseline).
Any of them may also own normalization tensors ("task norms").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from piggyback.config import PiggybackConfig
from piggyback.errors import TaskError
from piggyback.masks import (
    BITS_PER_WEIGHT,
    codes_to_mask,
    init_scores,
    mask_to_codes,
    threshold_scores,
)
from piggyback.packing import pack_codes, unpack_codes
from piggyback.targets import MaskTarget

Method = Literal["piggyback", "classifier", "finetune"]
METHODS: tuple[str, ...] = ("piggyback", "classifier", "finetune")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")


def check_task_name(name: str) -> str:
    """Task names become file names and module keys: letters, digits, '_' and '-' only."""
    if not isinstance(name, str) or not _TASK_NAME.match(name):
        raise TaskError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(it names a file and a module), not starting with '-'"
        )
    return name


class TensorStore(nn.Module):
    """Named tensors (parameters or buffers) keyed by their dotted backbone names, in order.

    nn.ParameterDict cannot hold buffers and refuses dots in keys; this keeps the original names.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "/")

    def add(self, name: str, tensor: Tensor, *, parameter: bool) -> None:
        key = self._key(name)
        if parameter:
            self.register_parameter(key, nn.Parameter(tensor, requires_grad=True))
        else:
            self.register_buffer(key, tensor)
        self.names.append(name)

    def __getitem__(self, name: str) -> Tensor:
        return getattr(self, self._key(name))

    def items(self) -> Iterator[tuple[str, Tensor]]:
        for name in self.names:
            yield name, self[name]

    def __len__(self) -> int:
        return len(self.names)


class TaskState(nn.Module):
    """The tensors of one task other than its head, plus its description."""

    def __init__(
        self,
        name: str,
        method: Method,
        *,
        num_classes: int | None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.task_name = check_task_name(name)
        self.method = method
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        # JSON-serialisable facts saved with the task: preprocessing it was trained with, results.
        self.info: dict = {}
        # Feature prototypes for routing inputs to this task (`piggyback.routing`), or None.
        self.routing = None
        self.scores = TensorStore()  # piggyback, trainable
        self.register_buffer("packed_masks", None)  # piggyback, frozen (loaded from a file)
        self.norms = TensorStore()  # task-specific normalization tensors
        self.weights = TensorStore()  # finetune: a copy of every backbone tensor

    # -- building -------------------------------------------------------------------------------

    def init_scores(
        self, targets: list[MaskTarget], config: PiggybackConfig, seed: int | None, device
    ) -> None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for target in targets:
            scores = init_scores(torch.Size(target.shape), config, generator).to(device)
            self.scores.add(target.name, scores, parameter=True)

    def set_packed_masks(self, packed: Tensor) -> None:
        self.packed_masks = packed

    def copy_tensors(self, store: TensorStore, tensors: dict[str, Tensor]) -> None:
        """Own copies of backbone tensors: floating parameters train, buffers are carried."""
        for name, tensor in tensors.items():
            parameter = isinstance(tensor, nn.Parameter) and tensor.is_floating_point()
            store.add(name, tensor.detach().clone(), parameter=parameter)

    # -- reading --------------------------------------------------------------------------------

    @property
    def is_packed(self) -> bool:
        """A piggyback task loaded from a file: its masks are packed bits, it has no scores."""
        return self.method == "piggyback" and self.packed_masks is not None

    @property
    def trains_norms(self) -> bool:
        """Whether its normalization layers run in training mode (own statistics)."""
        return self.method == "finetune" or len(self.norms) > 0

    def masks(self, targets: list[MaskTarget], config: PiggybackConfig) -> list[Tensor]:
        """The mask of every target (float32); differentiable when the task has scores."""
        if self.is_packed:
            bits = BITS_PER_WEIGHT[config.mask_kind]
            total = sum(t.numel for t in targets)
            codes = unpack_codes(self.packed_masks, total, bits)
            flat = codes_to_mask(codes, config.mask_kind, torch.float32)
            sizes = [t.numel for t in targets]
            return [m.view(t.shape) for m, t in zip(flat.split(sizes), targets, strict=True)]
        return [
            threshold_scores(self.scores[t.name], config.mask_kind, config.threshold)
            for t in targets
        ]

    def packed(self, targets: list[MaskTarget], config: PiggybackConfig) -> Tensor:
        """All masks as one flat bit-packed uint8 tensor, in target order (ceil(P*bits/8) bytes)."""
        if self.is_packed:
            return self.packed_masks
        with torch.no_grad():
            masks = self.masks(targets, config)
            codes = torch.cat([mask_to_codes(m, config.mask_kind).reshape(-1) for m in masks])
        return pack_codes(codes, BITS_PER_WEIGHT[config.mask_kind])

    def mask_inputs(self) -> list[Tensor]:
        """The tensors the masks are computed from (to detect in-place changes)."""
        if self.is_packed:
            return [self.packed_masks]
        return [t for _, t in self.scores.items()]

    def swapped_names(self, targets: list[MaskTarget]) -> list[str]:
        """Backbone tensor names this task replaces during its forward pass, in a fixed order."""
        masked = [t.name for t in targets] if self.method == "piggyback" else []
        return masked + self.norms.names + self.weights.names

    def own_tensors(self) -> list[Tensor]:
        """The norm and full-weight tensors, in `swapped_names` order after the masked ones."""
        return [t for _, t in self.norms.items()] + [t for _, t in self.weights.items()]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role; the head is added by the model."""
        groups = {
            "scores": list(self.scores.parameters()),
            "norms": list(self.norms.parameters()),
            "backbone": list(self.weights.parameters()),
        }
        return {name: params for name, params in groups.items() if params}
