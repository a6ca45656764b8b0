"""The multi-task model: one frozen backbone, one mask (plus head, optional norms) per task.

`PiggybackModel(backbone, config)` wraps a model in place, like PEFT's `get_peft_model`. The
backbone's modules are left as they are; only its classifier head(s) are replaced (`TaskHeads`).
For each forward pass the active task's tensors are put into the backbone's slots (see `swap`):
W * mask for every masked weight, and the task's own norm tensors when it has them. In eval mode
those tensors are computed once per task switch and cached, so inference costs the same as the
plain backbone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from piggyback import model_dir, taskfile
from piggyback.classifiers import find_heads
from piggyback.config import PiggybackConfig
from piggyback.errors import TaskError, TaskFileError, UnsupportedModelError
from piggyback.fingerprint import fingerprint
from piggyback.heads import (
    TaskHeads,
    heads_activated,
    heads_by_slot,
    install_task_heads,
    new_head,
    original_heads,
)
from piggyback.masks import fraction_on, weighted_fraction_on
from piggyback.methods import TaskMethod, get_method
from piggyback.norms import is_norm, norm_types
from piggyback.recompute import BackwardSwap, reapply_in_backward
from piggyback.swap import Slot, swapped
from piggyback.targets import (
    MaskTarget,
    check_unmasked,
    find_mask_targets,
    find_norm_tensors,
    in_any_subtree,
)
from piggyback.tasks import TaskMetadata, TaskState, check_task_name


def _version(tensor: Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter and cannot change
        return -1


def _backbone_fingerprint(backbone: nn.Module, heads: list[str]) -> str | None:
    """The fingerprint of the backbone's weights (heads excluded); None on the meta device, where
    tensors have shapes but no values (models built there only to check their structure)."""
    tensors = {n: t for n, t in backbone.state_dict().items() if not in_any_subtree(n, heads)}
    if any(t.is_meta for t in tensors.values()):
        return None
    return fingerprint(tensors)


class PiggybackModel(nn.Module):
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
        self.config = config = config or PiggybackConfig()
        # Every classifier the model declares (two for timm's distilled models) is replaced.
        self.head_names: list[str] = [config.head] if config.head else find_heads(backbone)
        self.head_name = self.head_names[0]
        heads = self.head_names
        self.backbone_spec = dict(backbone_spec or {})
        self._fingerprint = _backbone_fingerprint(backbone, heads)
        self.targets: list[MaskTarget] = find_mask_targets(backbone, config, heads)
        self.unmasked: list[str] = check_unmasked(backbone, config, heads, self.targets)
        self.norm_names: list[str] = find_norm_tensors(backbone, heads)
        self._original_requires_grad = {n: p.requires_grad for n, p in backbone.named_parameters()}
        backbone.requires_grad_(False)
        install_task_heads(backbone, heads)
        self.backbone = backbone
        self.task_states = nn.ModuleDict()
        norms = norm_types()
        self._norm_modules = [
            m
            for n, m in backbone.named_modules()
            if is_norm(m, norms) and not in_any_subtree(n, heads)
        ]
        self._active: str | None = None
        self._slots: dict[str, Slot] = {}
        self._cache: tuple[tuple, list[Tensor]] | None = None
        # Swapping tensors into the shared backbone is not safe from two threads at once; the
        # lock makes concurrent forward passes wait instead of mixing each other's weights.
        self._swap_lock = threading.RLock()
        self._backward_swap = BackwardSwap(self._swap_lock)
        self._applied: list[dict[str, Tensor]] = []  # originals of the swaps now active
        self.train(backbone.training)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the backbone weights the masks belong to (recorded in every task file)."""
        if self._fingerprint is None:
            raise UnsupportedModelError(
                "the backbone is on the meta device: its weights have no values, so there is "
                "nothing to fingerprint, save or load; build it with real weights for that"
            )
        return self._fingerprint

    # -- tasks ----------------------------------------------------------------------------------

    @property
    def heads(self) -> TaskHeads:
        """The wrapper in the (first) head's place."""
        return self.backbone.get_submodule(self.head_name)

    def _named_wrappers(self) -> dict[str, TaskHeads]:
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
        with self._swap_lock:
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
        self._cache = None
        self._sync_norm_modes()

    def delete_task(self, name: str) -> None:
        """Remove a task and its head; other tasks are untouched (waits for running forwards)."""
        self.task(name)
        with self._swap_lock:
            del self.task_states[name]
            if self._active == name:
                self._active = None
                for wrapper in self._head_wrappers():
                    wrapper.activate(None, None)
            self._cache = None

    def freeze_task(self, name: str | None = None) -> None:
        """TRAINABLE -> FROZEN: pack the task's masks to bits and stop it training (inference)."""
        self.task(name).freeze(self.targets, self.config)
        self._cache = None

    def unfreeze_task(self, name: str | None = None) -> None:
        """FROZEN -> TRAINABLE: continue training a saved task; scores are rebuilt from its mask
        (on: init_value, off: 0), so training resumes from exactly the saved task."""
        state = self.task(name)
        state.unfreeze(self.targets, self.config)
        self._cache = None
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
        self._cache = None
        self._sync_norm_modes()
        return self

    def _sync_norm_modes(self) -> None:
        """Frozen (shared) normalization always runs in eval mode, as in the paper."""
        state = self.task_states[self._active] if self._active else None
        learn = self.training and state is not None and state.trains_norms
        for module in self._norm_modules:
            module.train(learn)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        state = self.task()
        slots = self._task_slots(state)
        if not self._needs_graph(state):  # inference: the cached tensors, no graph
            with self._swapped(slots, self._cached_tensors(state)):
                return self.backbone(*args, **kwargs)
        if self.training and torch.is_grad_enabled():
            state.require_trainable()
        tensors = self._compute_tensors(state)
        with self._swapped(slots, tensors):
            outputs = self.backbone(*args, **kwargs)
        # Recomputation during backward (gradient checkpointing) must see the same tensors.
        return reapply_in_backward(outputs, self._backward_swap, state.task_name, slots, tensors)

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
            self._swapped(self._task_slots(state), tensors),
            heads_activated(self._head_wrappers(), state.task_name, state.head),
        ):
            yield self.backbone

    @property
    def swap_lock(self) -> threading.RLock:
        """Held while tensors are swapped in and while tasks are added or removed; hold it to
        run several steps against one unchanging set of tasks (re-entrant)."""
        return self._swap_lock

    def backbone_features(self, *args, **kwargs) -> Tensor:
        """What the frozen backbone, with no task applied, hands to its head (pooled features).

        Task routing compares these with each task's prototypes (`piggyback.routing`). A feature
        map (before a convolutional head) is averaged over its spatial positions. Every head slot
        is bypassed: a two-head model (distilled DeiT) then combines its two tokens' features as
        it combines its heads' outputs.
        """
        with self._swap_lock:
            wrappers = self._named_wrappers()
            for name in wrappers:
                self.backbone.set_submodule(name, nn.Identity())
            try:
                features = self.backbone(*args, **kwargs)
            finally:
                for name, wrapper in wrappers.items():
                    self.backbone.set_submodule(name, wrapper)
        return features.flatten(2).mean(2) if features.dim() > 2 else features

    def task_tensors(self, task: str | None = None) -> list[Tensor]:
        """The tensors a task puts into the backbone (W * mask, norms), computed without a graph."""
        state = self.task(task)
        with torch.inference_mode(False), torch.no_grad():
            return self._compute_tensors(state)

    def _task_slots(self, state: TaskState) -> list[Slot]:
        names = state.method.swapped_names(state, self) + state.norms.names
        return [self._slot(n) for n in names]

    def _slot(self, name: str) -> Slot:
        if name not in self._slots:
            self._slots[name] = Slot.resolve(self.backbone, name)
        return self._slots[name]

    @contextmanager
    def _swapped(self, slots: list[Slot], tensors: list[Tensor]) -> Iterator[None]:
        """`swap.swapped` under the lock, remembering the originals for `backbone_weight`."""
        with self._swap_lock:
            self._applied.append({slot.name: slot.get() for slot in slots})
            try:
                with swapped(slots, tensors):
                    yield
            finally:
                self._applied.pop()

    def backbone_weight(self, name: str) -> Tensor:
        """The frozen backbone tensor called `name`, also while a task's tensors are applied
        (a forward pass inside `task_applied` must mask W, not the applied W * mask)."""
        for originals in self._applied:  # the outermost swap holds the frozen originals
            if name in originals:
                return originals[name]
        return self._slot(name).get()

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
        key = (state.task_name, id(state), tuple((id(t), _version(t)) for t in inputs))
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self._compute_tensors(state))
        return self._cache[1]

    def _compute_tensors(self, state: TaskState) -> list[Tensor]:
        return state.method.tensors(state, self) + state.own_tensors()

    def _apply(self, fn, recurse=True):
        self._cache = None  # .to() / .cuda() / .half() give new tensors
        return super()._apply(fn, recurse)

    # -- inspection -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the backbone's weights are."""
        return next(self.backbone.parameters()).device

    def backbone_tensors(
        self, *, exclude_head: bool = False, names: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Backbone parameters and buffers by name, as the original (frozen) tensors."""
        tensors = dict(self.backbone.named_parameters()) | dict(self.backbone.named_buffers())
        if names is not None:
            return {n: tensors[n] for n in names}
        return {
            n: t
            for n, t in tensors.items()
            if not (exclude_head and in_any_subtree(n, self.head_names))
        }

    def mask_density(self, task: str | None = None) -> dict[str, float]:
        """Fraction of non-zero mask entries per masked tensor (piggyback tasks only)."""
        state = self.task(task)
        if not state.method.uses_masks:
            return {}
        with torch.no_grad():
            masks = state.masks(self.targets, self.config)
            return {t.name: fraction_on(m) for t, m in zip(self.targets, masks, strict=True)}

    def overall_density(self, task: str | None = None) -> float | None:
        """Fraction of masked weights left on, over all masked tensors."""
        density = self.mask_density(task)
        if not density:
            return None
        return weighted_fraction_on(density, {t.name: t.numel for t in self.targets})

    @property
    def num_masked(self) -> int:
        return sum(t.numel for t in self.targets)

    # -- merge / unload -------------------------------------------------------------------------

    def merge(self, task: str | None = None) -> nn.Module:
        """A plain copy of the backbone with the task baked in: W * mask, its head and norms.

        The result holds no piggyback class, runs without this library and exports with
        torch.export / ONNX. This model is left unchanged.
        """
        state = self.task(task)
        head = state.head
        with torch.no_grad():
            tensors = self._compute_tensors(state)
        wrappers = self._named_wrappers()
        for name, module in heads_by_slot(head, self.head_names).items():
            self.backbone.set_submodule(name, module)
        try:
            merged = copy.deepcopy(self.backbone)
        finally:
            for name, wrapper in wrappers.items():
                self.backbone.set_submodule(name, wrapper)
        for slot_in_model, tensor in zip(self._task_slots(state), tensors, strict=True):
            slot = Slot.resolve(merged, slot_in_model.name)
            value = tensor.detach().clone()
            slot.store[slot.key] = nn.Parameter(value) if slot.is_parameter else value
        merged.requires_grad_(True)
        return merged.eval()

    def unload(self) -> nn.Module:
        """Give back the backbone as it was: its own head, requires_grad flags and modes.

        Every task is dropped; this model is unusable afterwards.
        """
        for name, wrapper in self._named_wrappers().items():
            self.backbone.set_submodule(name, wrapper.original)
        backbone = self.backbone
        for name, param in backbone.named_parameters():
            param.requires_grad_(self._original_requires_grad.get(name, True))
        backbone.train(self.training)  # norm modules follow the model's mode again
        self.task_states = nn.ModuleDict()
        self._active = None
        self._cache = None
        self._slots = {}
        return backbone

    # -- files (see piggyback.taskfile and piggyback.model_dir) ---------------------------------

    def save_task(
        self,
        path: str | Path,
        task: str | None = None,
        *,
        codec: str | None = None,
        head_dtype: str | None = None,
    ) -> Path:
        """Write one task to a safetensors file (coded masks, head, norms, metadata).

        codec: how masks are stored ("zstd": entropy-coded; "packed": 1 or 2 bits per weight);
            None: "zstd" unless packed is smaller (tiny models).
        head_dtype: "float16" or "bfloat16" stores the head and task norms compactly (lossy);
            None keeps them as they are.
        """
        name = self.task(task).task_name
        return taskfile.save_task(self, name, Path(path), codec=codec, head_dtype=head_dtype)

    def load_task(
        self,
        path: str | Path,
        name: str | None = None,
        *,
        check_fingerprint: bool = True,
        replace: bool = False,
    ) -> str:
        """Add the task stored in `path` as `name` (default: its saved name), frozen; returns
        the name. `unfreeze_task(name)` makes it trainable again. `replace=True` replaces a task
        of that name, once the file has been checked completely."""
        return taskfile.load_task(
            self, Path(path), name=name, check_fingerprint=check_fingerprint, replace=replace
        )

    def save_pretrained(
        self,
        directory: str | Path,
        tasks: list[str] | None = None,
        *,
        codec: str | None = None,
        head_dtype: str | None = None,
    ) -> Path:
        """Write the model config and one file per task into `directory` (like PEFT); `codec`
        and `head_dtype` as for `save_task`."""
        return model_dir.save_pretrained(
            self, Path(directory), tasks, codec=codec, head_dtype=head_dtype
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        backbone: nn.Module | None = None,
        *,
        tasks: list[str] | None = None,
        check_fingerprint: bool = True,
    ) -> PiggybackModel:
        """Rebuild a saved model: onto `backbone`, or the one its config describes."""
        directory = Path(directory)
        data = model_dir.read_model_config(directory)
        config = model_dir.index_config(directory, data)
        spec = data["backbone"].get("spec") or {}
        if backbone is None:
            if not spec:
                raise TaskFileError(f"{directory} does not say how to build its backbone; pass one")
            from piggyback.backbones import create_backbone_from_spec  # imports timm: lazily

            backbone = create_backbone_from_spec(spec).model
        model = cls(backbone, config, backbone_spec=spec)
        if check_fingerprint:
            taskfile.check_backbone(model, directory, data["backbone"]["fingerprint"], spec)
        names = list(data["tasks"]) if tasks is None else tasks
        for name in names:
            if name not in data["tasks"]:
                raise TaskError(f"{directory} has no task {name!r}; it has {list(data['tasks'])}")
            path = model_dir.indexed_task_path(directory, name, data["tasks"][name])
            taskfile.load_task(
                model, path, name=name, check_fingerprint=check_fingerprint, expected_name=name
            )
        return model
