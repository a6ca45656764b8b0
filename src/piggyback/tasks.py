"""One task: its head, its own tensors (mask scores or packed masks, norms, weights), its
description, and where it is in its lifecycle.

What the tensors are depends on the task's method (`piggyback.methods`): mask scores or packed
masks ("piggyback"), nothing ("classifier"), or a full copy of the backbone ("finetune"). Any task
may own normalization tensors ("task norms").

Lifecycle (the guard is modelled on Avalanche's PackNet `State`): a task is TRAINABLE when it is
added (real-valued scores, trainable head) and FROZEN once packed or loaded from a file (1 bit
per weight, nothing trains). Training a frozen task is refused with what to do; continuing to
train a saved task is the explicit `unfreeze` (scores rebuilt from its mask), never a silent
head-only training.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from piggyback.config import PiggybackConfig
from piggyback.errors import TaskError
from piggyback.masks import fraction_on
from piggyback.methods import TaskMethod, get_method
from piggyback.packing import pack_codes, unpack_codes
from piggyback.routing import AUTO
from piggyback.targets import MaskTarget

_TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # fullmatch: no trailing newline


def check_task_name(name: str) -> str:
    """Task names become file names and module keys: letters, digits, '_' and '-' only; and
    "auto", which asks for task routing wherever a task is named, cannot name one."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise TaskError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '_' or '-' "
            "(it names a file and a module), not starting with '-'"
        )
    if name == AUTO:
        raise TaskError(
            f"invalid task name {AUTO!r}: it is reserved for task routing (tasks='auto' lets "
            "each image choose its task); choose another name (a task saved under it loads "
            "with load_task(path, name='other'); from_pretrained(..., tasks=[...]) skips it)"
        )
    return name


class TaskStateError(TaskError):
    """An operation that the task's lifecycle state does not allow (e.g. training a frozen task)."""


class TaskPhase(enum.Enum):
    TRAINABLE = "trainable"
    FROZEN = "frozen"


_ALLOWED = {
    TaskPhase.TRAINABLE: {TaskPhase.FROZEN},
    TaskPhase.FROZEN: {TaskPhase.TRAINABLE},
}


@dataclass
class TaskMetadata:
    """What is known about a task besides its tensors; saved with it as JSON.

    Attributes:
        class_names: the name of each output class, in output order.
        preprocess: how its images are prepared (`piggyback.preprocess` reads it).
        training: how it was trained (method, epochs, seed, data, ...).
        results: what it scored (best epoch, val/test top-1, density, ...).
        extra: keys written by another piggyback version, kept so they survive a rewrite.
    """

    class_names: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _INFO_KEYS = ("preprocess", "training", "results")

    def info_dict(self) -> dict[str, Any]:
        """The file's "info" object (everything but the class names, which have their own key)."""
        data = {k: v for k, v in asdict(self).items() if k in self._INFO_KEYS and v is not None}
        return {**self.extra, **data}

    @classmethod
    def from_file(cls, info: Any, class_names: Any) -> TaskMetadata:
        info = dict(info) if isinstance(info, dict) else {}
        known = {k: info.pop(k) for k in cls._INFO_KEYS if k in info}
        names = [str(n) for n in class_names] if isinstance(class_names, list) else None
        return cls(class_names=names, extra=info, **known)


def head_outputs(head: nn.Module) -> int | None:
    """The number of classes a head predicts (Linear out_features, conv out_channels)."""
    for attribute in ("out_features", "out_channels", "num_classes"):
        value = getattr(head, attribute, None)
        if isinstance(value, int):
            return value
    return None


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
    """One task: its head, its method's tensors, optional norms, its metadata and phase.

    Args:
        name: the task's name (letters, digits, '_' and '-'; it names a file).
        method: a registered method name or `TaskMethod`.
        head: the task's classifier head (owned: it moves and saves with the task).
        metadata: class names, preprocessing, training record, results.
        head_classes: classes of a newly built head, or None when the head is a copy of the
            backbone's own (the file records this so the head can be rebuilt).
    """

    def __init__(
        self,
        name: str,
        method: str | TaskMethod,
        *,
        head: nn.Module,
        metadata: TaskMetadata | None = None,
        head_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.task_name = check_task_name(name)
        self.method: TaskMethod = get_method(method)
        self.head = head
        self.head_classes = head_classes
        self.metadata = metadata or TaskMetadata()
        self.class_names = self.metadata.class_names  # checked against the head
        self.phase = TaskPhase.TRAINABLE
        self.scores = TensorStore()  # piggyback, trainable
        self.register_buffer("packed_masks", None)  # piggyback, frozen
        self.norms = TensorStore()  # task-specific normalization tensors
        self.weights = TensorStore()  # finetune: a copy of every backbone tensor
        # Feature prototypes for routing inputs to this task (`piggyback.routing`), or None.
        self.routing = None
        # (codec, head dtype) its task file chose (`task_coding.stored_as`): saving it again
        # keeps what `piggyback convert` set, unless the caller asks otherwise.
        self.stored_as: tuple[str | None, str | None] = (None, None)

    # -- description ----------------------------------------------------------------------------

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def num_classes(self) -> int | None:
        """The number of classes the task predicts: its head's outputs (the one definition)."""
        return head_outputs(self.head)

    @property
    def class_names(self) -> list[str] | None:
        return self.metadata.class_names

    @class_names.setter
    def class_names(self, names: list[str] | None) -> None:
        count = self.num_classes
        if names is not None and count is not None and len(names) != count:
            raise ValueError(f"{len(names)} class names for {count} classes")
        self.metadata.class_names = None if names is None else [str(n) for n in names]

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def is_frozen(self) -> bool:
        return self.phase is TaskPhase.FROZEN

    def _move_to(self, phase: TaskPhase) -> None:
        if phase not in _ALLOWED[self.phase]:
            raise TaskStateError(
                f"task {self.task_name!r} is already {self.phase.value}; "
                f"it cannot become {phase.value} again"
            )
        self.phase = phase

    def require_trainable(self) -> None:
        """Refuse to train a frozen task, saying what to do instead."""
        if self.is_frozen:
            raise TaskStateError(
                f"task {self.task_name!r} is frozen (loaded from a file or packed): nothing of it "
                f"trains. To continue training it call model.unfreeze_task({self.task_name!r}) "
                "(its scores are rebuilt from its mask), or add a new task"
            )

    def freeze(self, targets: list[MaskTarget], config: PiggybackConfig) -> None:
        """TRAINABLE -> FROZEN: masks packed to bits (scores dropped), nothing requires grad."""
        self._move_to(TaskPhase.FROZEN)
        if self.method.uses_masks and self.packed_masks is None:
            packed = self.packed(targets, config)
            self.scores = TensorStore()
            self.packed_masks = packed
        self.requires_grad_(False)

    def unfreeze(self, targets: list[MaskTarget], config: PiggybackConfig) -> None:
        """FROZEN -> TRAINABLE: scores rebuilt from the packed masks, reproducing them exactly."""
        self._move_to(TaskPhase.TRAINABLE)
        self.stored_as = (None, None)  # trained further: saved as asked, not as its file was
        if self.packed_masks is not None:
            with torch.no_grad():
                masks = self.masks(targets, config)
            self.packed_masks = None
            for target, mask in zip(targets, masks, strict=True):
                scores = config.kind.scores_from_mask(mask, config)
                self.scores.add(target.name, scores, parameter=True)

    # -- building -------------------------------------------------------------------------------

    def init_scores(
        self, targets: list[MaskTarget], config: PiggybackConfig, seed: int | None, device
    ) -> None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for target in targets:
            scores = config.kind.init_scores(torch.Size(target.shape), config, generator)
            self.scores.add(target.name, scores.to(device), parameter=True)

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
        """Its masks are packed bits (no scores): frozen piggyback tasks."""
        return self.method.uses_masks and self.packed_masks is not None

    @property
    def trains_norms(self) -> bool:
        """Whether its normalization layers run in training mode (own statistics)."""
        return self.method.trains_norms or len(self.norms) > 0

    def masks(self, targets: list[MaskTarget], config: PiggybackConfig) -> list[Tensor]:
        """The mask of every target (float32); differentiable when the task has scores."""
        kind = config.kind
        if self.is_packed:
            total = sum(t.numel for t in targets)
            codes = unpack_codes(self.packed_masks, total, kind.code_bits)
            flat = kind.from_codes(codes, torch.float32)
            sizes = [t.numel for t in targets]
            return [m.view(t.shape) for m, t in zip(flat.split(sizes), targets, strict=True)]
        return [kind.mask(self.scores[t.name], config) for t in targets]

    def mask_density(self, targets: list[MaskTarget], config: PiggybackConfig) -> dict[str, float]:
        """Fraction of non-zero mask entries per masked tensor ({} for methods without masks)."""
        if not self.method.uses_masks:
            return {}
        with torch.no_grad():
            masks = self.masks(targets, config)
            return {t.name: fraction_on(m) for t, m in zip(targets, masks, strict=True)}

    def packed(self, targets: list[MaskTarget], config: PiggybackConfig) -> Tensor:
        """All masks as one flat bit-packed uint8 tensor, in target order (ceil(P*bits/8) bytes)."""
        if self.is_packed:
            return self.packed_masks
        kind = config.kind
        with torch.no_grad():
            masks = self.masks(targets, config)
            codes = torch.cat([kind.to_codes(m).reshape(-1) for m in masks])
        return pack_codes(codes, kind.code_bits)

    def mask_inputs(self) -> list[Tensor]:
        """The tensors its swapped tensors are computed from (to detect in-place changes)."""
        if self.is_packed:
            return [self.packed_masks]
        return [t for _, t in self.scores.items()]

    def own_tensors(self) -> list[Tensor]:
        """The norm tensors, swapped in after the method's tensors."""
        return [t for _, t in self.norms.items()]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role, in optimizer order: scores / backbone / head / norms."""
        groups = {
            "scores": list(self.scores.parameters()),
            "backbone": list(self.weights.parameters()),
            "head": list(self.head.parameters()),
            "norms": list(self.norms.parameters()),
        }
        return {name: params for name, params in groups.items() if params}
