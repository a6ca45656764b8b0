"""Task methods: what a task owns besides its head, and how it changes the backbone's weights.

A method is a strategy object registered by name, like a mask kind (`piggyback.mask_kinds`): the
model, task files, the training recipe and `piggyback info` ask the method, never compare its
name. A new method is one subclass of `TaskMethod` plus `register_method(TheMethod())`.

Built in:
- "piggyback": a learned mask per masked weight (scores while training, packed bits once frozen).
- "classifier": nothing but the head (the paper's classifier-only baseline).
- "finetune": a full copy of every backbone tensor (the paper's fine-tuning baseline).
Any method may also own normalization tensors ("task norms"); `TaskState` handles those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from piggyback.registry import Registry

if TYPE_CHECKING:
    from piggyback.model import PiggybackModel
    from piggyback.tasks import TaskState


class TaskMethod:
    """How one kind of task is built, applied to the backbone and stored.

    The training recipe's defaults for the method live here too (`default_optimizer`,
    `default_lr`, `decays_lr`), so a new method brings its own recipe.
    """

    name: ClassVar[str]
    #: Whether the task has masks (scores or packed bits) over the model's mask targets.
    uses_masks: ClassVar[bool] = False
    #: Whether normalization layers train (own statistics) even without task norms.
    trains_norms: ClassVar[bool] = False
    default_optimizer: ClassVar[str] = "sgd"
    default_lr: ClassVar[float] = 1e-3
    #: Whether the default schedule decays the learning rate (x0.1 at half the epochs).
    decays_lr: ClassVar[bool] = True

    def build(self, state: TaskState, model: PiggybackModel, seed: int | None) -> None:
        """Give a new task its own tensors (the head is built by the model)."""

    def swapped_names(self, state: TaskState, model: PiggybackModel) -> list[str]:
        """Backbone tensors this method replaces, in the order of `tensors`."""
        return []

    def tensors(self, state: TaskState, model: PiggybackModel) -> list[Tensor]:
        """The tensors to put into the backbone's slots (differentiable while training)."""
        return []

    def file_tensors(self, state: TaskState, model: PiggybackModel) -> dict[str, Tensor]:
        """This method's tensors for a task file, by file key (the head and norms are added)."""
        return {}

    def load_file_tensors(self, state: TaskState, model: PiggybackModel, read: FileTensors) -> None:
        """Fill a task being loaded from the checked contents of a task file."""


class FileTensors:
    """A task file's tensors being loaded, with the checks a method needs (see `taskfile`)."""

    def masks(self) -> Tensor:  # pragma: no cover - implemented by taskfile.FileReader
        raise NotImplementedError

    def backbone_like(self, prefix: str, names: list[str] | None) -> dict[str, Tensor]:
        raise NotImplementedError  # pragma: no cover


class PiggybackMethod(TaskMethod):
    """The paper's method: the backbone's weights times a learned mask."""

    name = "piggyback"
    uses_masks = True
    default_optimizer = "adam"
    default_lr = 1e-4

    def build(self, state: TaskState, model: PiggybackModel, seed: int | None) -> None:
        state.init_scores(model.targets, model.config, seed, model.device)

    def swapped_names(self, state: TaskState, model: PiggybackModel) -> list[str]:
        return [t.name for t in model.targets]

    def tensors(self, state: TaskState, model: PiggybackModel) -> list[Tensor]:
        kind = model.config.kind
        masks = state.masks(model.targets, model.config)
        return [
            kind.masked_weight(model.backbone_weight(t.name), mask)
            for t, mask in zip(model.targets, masks, strict=True)
        ]

    def file_tensors(self, state: TaskState, model: PiggybackModel) -> dict[str, Tensor]:
        return {"masks": state.packed(model.targets, model.config)}

    def load_file_tensors(self, state: TaskState, model: PiggybackModel, read: FileTensors) -> None:
        state.set_packed_masks(read.masks().to(model.device))


class ClassifierMethod(TaskMethod):
    """Only the head is learned; the backbone is used as it is."""

    name = "classifier"
    decays_lr = False


class FinetuneMethod(TaskMethod):
    """Every backbone tensor is copied and trained: the baseline piggyback is measured against."""

    name = "finetune"
    trains_norms = True

    def build(self, state: TaskState, model: PiggybackModel, seed: int | None) -> None:
        state.copy_tensors(state.weights, model.backbone_tensors(exclude_head=True))

    def swapped_names(self, state: TaskState, model: PiggybackModel) -> list[str]:
        return list(state.weights.names)

    def tensors(self, state: TaskState, model: PiggybackModel) -> list[Tensor]:
        return [t for _, t in state.weights.items()]

    def file_tensors(self, state: TaskState, model: PiggybackModel) -> dict[str, Tensor]:
        return {f"weight/{name}": t for name, t in state.weights.items()}

    def load_file_tensors(self, state: TaskState, model: PiggybackModel, read: FileTensors) -> None:
        state.copy_tensors(state.weights, read.backbone_like("weight/", None))


_METHODS: Registry[TaskMethod] = Registry(
    "method", "register new ones with piggyback.methods.register_method"
)


def register_method(method: TaskMethod, *, replace: bool = False) -> TaskMethod:
    """Make `method` available by its name (add_task(method=name), task files, the CLI)."""
    return _METHODS.register(method.name, method, replace=replace)


def get_method(name: str | TaskMethod) -> TaskMethod:
    """The registered method called `name` (a method object is returned as it is)."""
    return name if isinstance(name, TaskMethod) else _METHODS.get(name)


unregister_method = _METHODS.unregister
method_names = _METHODS.names

register_method(PiggybackMethod())
register_method(ClassifierMethod())
register_method(FinetuneMethod())
