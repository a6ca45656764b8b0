"""The multi-task model: one frozen backbone, one mask (plus head, optional norms) per task.

`PiggybackModel(backbone, config)` wraps a model in place, like PEFT's `get_peft_model`. The
backbone's modules are left as they are; only its classifier head(s) are replaced (`TaskHeads`).
For each forward pass the active task's tensors are put into the backbone's slots (see `swap`):
W * mask for every masked weight, and the task's own norm tensors when it has them. In eval mode
those tensors are computed once per task switch and cached, so inference costs the same as the
plain backbone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from piggyback.backbone_layout import BackboneLayout
from piggyback.backbone_slots import BackboneSlots
from piggyback.config import PiggybackConfig
from piggyback.errors import TaskError, UnsupportedModelError
from piggyback.heads import (
    TaskHeads,
    heads_activated,
    heads_by_slot,
    install_task_heads,
    modules_in_slots,
    new_head,
    original_heads,
)
from piggyback.merge import merged_backbone
from piggyback.methods import TaskMethod, get_method
from piggyback.model_files import ModelFiles
from piggyback.model_inspection import ModelInspection
from piggyback.recompute import reapply_in_backward
from piggyback.swap import Slot
from piggyback.targets import (
    MaskTarget,
)
from piggyback.task_cache import TaskCache
from piggyback.tasks import TaskMetadata, TaskState, check_task_name


class PiggybackModel(ModelFiles, ModelInspection, nn.Module):
    """A frozen backbone adapted to several tasks, each by a learned mask and its own head.

    Args:
        backbone: any nn.Module (timm and torchvision classifiers are recognised automatically).
            It is modified in place: frozen, and its head replaced by per-task heads.
        config: which layers to mask and how; defaults are the paper's.
        backbone_spec: JSON-serialisable description of how to rebuild the backbone (saved with
            the model so that `from_pretrained` can recreate it); see `piggyback.backbones`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        config: PiggybackConfig | None = None,
        *,
        backbone_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, TaskHeads) for m in backbone.modules()):
            raise UnsupportedModelError("this backbone is already wrapped by a PiggybackModel")
        self.config = config or PiggybackConfig()
        self.backbone_spec = dict(backbone_spec or {})
        self._layout = layout = BackboneLayout.of(backbone, self.config)
        self.head_names: list[str] = layout.head_names
        self.head_name = self.head_names[0]
        self.targets: list[MaskTarget] = layout.targets
        self.unmasked: list[str] = layout.unmasked
        self.norm_names: list[str] = layout.norm_names
        backbone.requires_grad_(False)
        install_task_heads(backbone, self.head_names)
        self.backbone = backbone
        self.task_states = nn.ModuleDict()
        self._active: str | None = None
        self._slots = BackboneSlots(backbone)
        # The active task's tensors in eval mode: computed once per switch, not per forward.
        self._cache = TaskCache(max_tasks=1)
        self.train(backbone.training)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the backbone weights the masks belong to (recorded in every task file)."""
        if self._layout.fingerprint is None:
            raise UnsupportedModelError(
                "the backbone is on the meta device: its weights have no values, so there is "
                "nothing to fingerprint, save or load; build it with real weights for that"
            )
        return self._layout.fingerprint

    # -- tasks ----------------------------------------------------------------------------------

    @property
    def heads(self) -> TaskHeads:
        """The wrapper in the (first) head's place."""
        return self._named_wrappers()[self.head_name]

    def _named_wrappers(self) -> dict[str, TaskHeads]:
        # Under the swap lock: `backbone_features` puts nn.Identity in the head slots for the
        # length of a pass, and another thread loading a task must not copy that as the head.
        with self._slots.lock:
            return {name: self.backbone.get_submodule(name) for name in self.head_names}

    def _head_wrappers(self) -> list[TaskHeads]:
        return list(self._named_wrappers().values())

    @property
    def original_head(self) -> nn.Module:
        """The backbone's own head; a HeadGroup of them when it declares several."""
        return original_heads(self._named_wrappers())

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks, in the order they were added."""
        return list(self.task_states.keys())

    @property
    def active_task(self) -> str | None:
        return self._active

    def task(self, name: str | None = None) -> TaskState:
        """The state of task `name` (default: the active task)."""
        name = self._require_task() if name is None else name
        if name not in self.task_states:
            raise TaskError(f"unknown task {name!r}; this model has tasks {self.tasks}")
        return self.task_states[name]

    def _require_task(self) -> str:
        if self._active is None:
            hint = (
                f"one of {self.tasks}" if self.tasks else "add one with add_task(name, num_classes)"
            )
            raise TaskError(f"no task is set: call set_task(name) with {hint}")
        return self._active

    def add_task(
        self,
        name: str,
        num_classes: int | None = None,
        *,
        method: str | TaskMethod = "piggyback",
        class_names: list[str] | None = None,
        task_norms: bool | None = None,
        seed: int | None = None,
    ) -> TaskState:
        """Add a trainable task; it is not activated (call `set_task`).

        Args:
            num_classes: size of the task's new head; None copies the backbone's own head.
            method: a registered method (`piggyback.methods`): "piggyback" (learn a mask),
                "classifier" (head only) or "finetune" (all weights).
            class_names: optional names of the classes, saved with the task.
            task_norms: own normalization tensors for this task (default: config.task_norms).
            seed: seeds the head and score initialisation, so that a task is initialised the same
                whatever was added before it.
        """
        check_task_name(name)
        if name in self.task_states:
            raise TaskError(f"task {name!r} already exists; delete_task({name!r}) first")
        if class_names is not None and num_classes is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        strategy = get_method(method)
        state = TaskState(
            name,
            strategy,
            head=new_head(self.original_head, num_classes, seed),
            metadata=TaskMetadata(class_names=class_names),
            head_classes=num_classes,
        )
        strategy.build(state, self, seed)
        if not strategy.trains_norms and (
            self.config.task_norms if task_norms is None else task_norms
        ):
            state.copy_tensors(state.norms, self.backbone_tensors(names=self.norm_names))
        self.install_task(state)
        return state

    def install_task(self, state: TaskState, *, replace: bool = False) -> None:
        """Register a fully built task (add_task, task files, checkpoints); nothing trains yet.

        `replace=True` swaps out a task of the same name in one step: forward passes running in
        other threads finish first, and none sees the old task afterwards.
        """
        with self._slots.lock:
            if state.task_name in self.task_states:
                if not replace:
                    raise TaskError(f"task {state.task_name!r} already exists")
                self.delete_task(state.task_name)
            self.task_states[state.task_name] = state
        state.requires_grad_(False)

    def set_task(self, name: str) -> None:
        """Make `name` the active task: the one forward() runs and the only one that trains."""
        state = self.task(name)
        self._active = name
        for wrapper in self._head_wrappers():
            wrapper.activate(name, state.head)
        for other in self.task_states.values():
            other.requires_grad_(False)
        if not state.is_frozen:
            for group in state.parameter_groups().values():
                for param in group:
                    param.requires_grad_(True)
        self._cache.clear()
        self._sync_norm_modes()

    def delete_task(self, name: str) -> None:
        """Remove a task and its head; other tasks are untouched (waits for running forwards)."""
        self.task(name)
        with self._slots.lock:
            del self.task_states[name]
            if self._active == name:
                self._active = None
                for wrapper in self._head_wrappers():
                    wrapper.activate(None, None)
            self._cache.clear()

    def freeze_task(self, name: str | None = None) -> None:
        """TRAINABLE -> FROZEN: pack the task's masks to bits and stop it training (inference)."""
        self.task(name).freeze(self.targets, self.config)
        self._cache.clear()

    def unfreeze_task(self, name: str | None = None) -> None:
        """FROZEN -> TRAINABLE: continue training a saved task; scores are rebuilt from its mask
        (on: init_value, off: 0), so training resumes from exactly the saved task."""
        state = self.task(name)
        state.unfreeze(self.targets, self.config)
        self._cache.clear()
        if state.task_name == self._active:
            self.set_task(state.task_name)

    # -- training -------------------------------------------------------------------------------

    def trainable_parameters(self, task: str | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups of a task: scores / head / norms (or backbone, finetune).

        Each group is a dict with "name" and "params", so each can get its own learning rate:
        `torch.optim.Adam(model.trainable_parameters())`. A frozen task is refused.
        """
        state = self.task(task)
        state.require_trainable()
        return [{"name": n, "params": p} for n, p in state.parameter_groups().items()]

    def train(self, mode: bool = True) -> PiggybackModel:
        super().train(mode)
        self._cache.clear()
        self._sync_norm_modes()
        return self

    def _sync_norm_modes(self) -> None:
        """Frozen (shared) normalization always runs in eval mode, as in the paper."""
        state = self.task_states[self._active] if self._active else None
        learn = self.training and state is not None and state.trains_norms
        for module in self._layout.norm_modules:
            module.train(learn)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        state = self.task()
        slots = self._task_slots(state)
        if not self._needs_graph(state):  # inference: the cached tensors, no graph
            with self._slots.swapped(slots, self._cached_tensors(state)):
                return self.backbone(*args, **kwargs)
        if self.training and torch.is_grad_enabled():
            state.require_trainable()
        tensors = self._compute_tensors(state)
        with self._slots.swapped(slots, tensors):
            outputs = self.backbone(*args, **kwargs)
        # Recomputation during backward (gradient checkpointing) must see the same tensors.
        swap = self._slots.backward_swap
        return reapply_in_backward(outputs, swap, state.task_name, slots, tensors)

    @contextmanager
    def task_applied(self, task: str | None = None) -> Iterator[nn.Module]:
        """Within this block the backbone computes with a task's weights (default: active).

        For other backbone methods: `with m.task_applied() as b: b.forward_features(x)`.
        """
        state = self.task(task)
        with self.tensors_applied(state.task_name, self._task_tensors(state)) as backbone:
            yield backbone

    @contextmanager
    def tensors_applied(self, task: str, tensors: list[Tensor]) -> Iterator[nn.Module]:
        """The backbone with `tensors` (from `task_tensors(task)`) in the task's slots.

        Lets a caller keep the tensors of several tasks (an LRU cache of a predictor) and apply
        any of them without recomputing; the task's own head runs in the head slot.
        """
        state = self.task(task)
        with (
            self._slots.swapped(self._task_slots(state), tensors),
            heads_activated(self._head_wrappers(), state.task_name, state.head),
        ):
            yield self.backbone

    @property
    def swap_lock(self) -> threading.RLock:
        """Held while tensors are swapped in and while tasks are added or removed; hold it to
        run several steps against one unchanging set of tasks (re-entrant)."""
        return self._slots.lock

    def backbone_features(self, *args, **kwargs) -> Tensor:
        """What the frozen backbone, with no task applied, hands to its head (pooled features).

        Task routing compares these with each task's prototypes (`piggyback.routing`). A feature
        map (before a convolutional head) is averaged over its spatial positions. Every head slot
        is bypassed: a two-head model (distilled DeiT) then combines its two tokens' features as
        it combines its heads' outputs.
        """
        bypass = dict.fromkeys(self.head_names, nn.Identity())
        with self._slots.lock, modules_in_slots(self.backbone, bypass) as backbone:
            features = backbone(*args, **kwargs)
        return features.flatten(2).mean(2) if features.dim() > 2 else features

    def task_tensors(self, task: str | None = None) -> list[Tensor]:
        """The tensors a task puts into the backbone (W * mask, norms), computed without a graph."""
        state = self.task(task)
        with torch.inference_mode(False), torch.no_grad():
            return self._compute_tensors(state)

    def _task_slots(self, state: TaskState) -> list[Slot]:
        return self._slots.slots(state.method.swapped_names(state, self) + state.norms.names)

    def backbone_weight(self, name: str) -> Tensor:
        """The frozen backbone tensor called `name`, also while a task's tensors are applied
        (a forward pass inside `task_applied` must mask W, not the applied W * mask)."""
        return self._slots.original(name)

    def _needs_graph(self, state: TaskState) -> bool:
        return self.training or (
            torch.is_grad_enabled() and any(p.requires_grad for p in state.parameters())
        )

    def _task_tensors(self, state: TaskState) -> list[Tensor]:
        """The tensors to swap in; cached in eval mode when no gradient has to reach them."""
        if self._needs_graph(state):
            return self._compute_tensors(state)
        return self._cached_tensors(state)

    def _cached_tensors(self, state: TaskState) -> list[Tensor]:
        """The task's tensors without a graph, recomputed only when the task or its inputs
        changed (a switch, in-place edits of scores or weights)."""
        inputs = state.mask_inputs() + [self.backbone_weight(t.name) for t in self.targets]

        def compute() -> list[Tensor]:
            with torch.inference_mode(False), torch.no_grad():
                return self._compute_tensors(state)

        return self._cache.get(state.task_name, [state, *inputs], compute)

    def _compute_tensors(self, state: TaskState) -> list[Tensor]:
        return state.method.tensors(state, self) + state.own_tensors()

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # .to() / .cuda() / .half() give new tensors
        return super()._apply(fn, recurse)

    # -- merge / unload -------------------------------------------------------------------------

    def merge(self, task: str | None = None) -> nn.Module:
        """A plain copy of the backbone with the task baked in: W * mask, its head and norms.

        The result holds no piggyback class, runs without this library and exports with
        torch.export / ONNX. This model is left unchanged.
        """
        state = self.task(task)
        with torch.no_grad():
            tensors = self._compute_tensors(state)
        names = [slot.name for slot in self._task_slots(state)]
        heads = heads_by_slot(state.head, self.head_names)
        return merged_backbone(self.backbone, heads, dict(zip(names, tensors, strict=True)))

    def unload(self) -> nn.Module:
        """Give back the backbone as it was: its own head, requires_grad flags and modes.

        Every task is dropped; this model is unusable afterwards.
        """
        for name, wrapper in self._named_wrappers().items():
            self.backbone.set_submodule(name, wrapper.original)
        backbone = self.backbone
        for name, param in backbone.named_parameters():
            param.requires_grad_(self._layout.requires_grad.get(name, True))
        backbone.train(self.training)  # norm modules follow the model's mode again
        self.task_states = nn.ModuleDict()
        self._active = None
        self._cache.clear()
        self._slots.forget()
        return backbone
