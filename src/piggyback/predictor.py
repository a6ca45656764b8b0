"""Serving many tasks from one backbone: `Predictor`.

The point of piggyback at inference is one backbone in memory and any number of tasks at ~1 bit
per weight each, any request answered by any task. A `Predictor` keeps every loaded task frozen
(packed) and the masked weights of the most recently used ones in an LRU `TaskCache`, so
alternating between a few tasks recomputes nothing. A batch may mix tasks: it is grouped by task
and each group runs once (as PEFT's `adapter_names`), so each image gets exactly the result its
group computes. `tasks="auto"` picks each image's task from the image itself (`piggyback.routing`).

Thread safe: forward passes take turns on the model's swap lock (each with its own task's weights
and head), loading or deleting a task waits for them, and the cache has its own lock.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from piggyback.errors import TaskError
from piggyback.inputs import (
    ImageInput,
    PreparedImage,
    PreparedImages,
    Transform,
    as_image_list,
    as_task_list,
    network_batch,
    prepare_image,
    preprocess_key,
    whole_number,
)
from piggyback.model import PiggybackModel
from piggyback.routing import (
    AUTO,
    NoRoutingProfileWarning,
    Route,
    route_by_entropy,
    route_by_prototypes,
)
from piggyback.task_cache import CacheInfo, TaskCache
from piggyback.task_prediction import TaskPrediction, class_names
from piggyback.tasks import TaskState

__all__ = ["AUTO", "Predictor", "TaskPrediction"]


class Predictor:
    """Answers images with any of a model's tasks, keeping recently used tasks ready.

    Args:
        model: the model whose tasks to serve; it is put in eval mode and tasks still trainable
            are frozen (masks packed to bits): the Predictor owns it from now on.
        max_cached_tasks: how many tasks' masked weights stay in memory (None: no limit).
        max_cache_bytes: the same budget in bytes (None: no limit); both apply when both are set.
        batch_invariant: answer each image of a call as if it came alone (routing included),
            so that each answer is bit for bit the image's answer alone, whatever else is in the
            batch (cached task weights make the extra calls cheap). Without it, an answer equals
            that of the task's own batch of the same samples exactly, but not always that of a
            batch of one: CPU kernels (oneDNN convolutions, matrix products, vectorized
            activations such as SiLU) sum or round differently by batch size, in the last bits
            of float32. Costs the batching speed-up (see `benchmarks/serving.py`).
    """

    def __init__(
        self,
        model: PiggybackModel,
        *,
        max_cached_tasks: int | None = 4,
        max_cache_bytes: int | None = None,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model.eval()
        self.batch_invariant = batch_invariant
        for name in model.tasks:
            if not model.task(name).is_frozen:
                model.freeze_task(name)
        self.task_cache = TaskCache(max_tasks=max_cached_tasks, max_bytes=max_cache_bytes)
        self._lock = threading.Lock()  # guards the memos below
        self._preprocess: dict[str, tuple[object, dict[str, Any]]] = {}
        self._transforms: dict[str, Transform] = {}
        self._warned: set[tuple[str, ...]] = set()

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        device: str | torch.device = "auto",
        tasks: Sequence[str] | None = None,
        backbone: nn.Module | None = None,
        channels_last: bool = True,
        **options: Any,
    ) -> Predictor:
        """A Predictor over a saved model directory (all its tasks, or `tasks`), on `device`.

        `backbone`: the network to load the tasks onto, for models whose directory cannot say
        how to build it (your own nn.Module); by default it is built from the saved spec.
        `channels_last`: the memory layout training uses too; convolutions run faster in it.
        """
        from piggyback.device import resolve_device

        names = list(tasks) if tasks is not None else None
        model = PiggybackModel.from_pretrained(directory, backbone, tasks=names)
        model.to(resolve_device(str(device)))
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return cls(model, **options)

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return next(self.model.parameters()).device

    # -- tasks ----------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    def task_description(self, name: str) -> dict[str, Any]:
        """What a client needs to know about a task: classes, preprocessing, results, routing."""
        state = self.model.task(name)
        num_classes = state.num_classes
        profile = state.routing
        return {
            "task": name,
            "method": state.method_name,
            "num_classes": num_classes,
            "classes": class_names(state.class_names, num_classes, name),
            "preprocess": self.preprocess(name),
            "results": state.metadata.results,
            "routing": profile.describe() if profile is not None else None,
            "bytes": self.memory()["tasks"][name],
        }

    def load_task(self, path: str | Path, name: str | None = None, *, replace: bool = False) -> str:
        """Add the task in a task file; `replace=True` swaps out a loaded task of that name.

        The file is checked completely first; the swap itself waits for running forward passes,
        and the cache forgets the old task, so no request is answered by a half or stale task.
        """
        loaded = self.model.load_task(path, name, replace=replace)
        self.task_cache.discard(loaded)  # its entry would miss anyway; free the memory now
        return loaded

    def delete_task(self, name: str) -> None:
        """Unload a task (waits for running forward passes; its cached weights are dropped)."""
        self.model.delete_task(name)
        self.task_cache.discard(name)

    def preprocess(self, name: str) -> dict[str, Any]:
        """The task's evaluation preprocessing (image size, resize, mean, std, interpolation)."""
        from piggyback.preprocess import resolve_preprocess

        state = self.model.task(name)
        with self._lock:
            memo = self._preprocess.get(name)
            if memo is not None and memo[0] is state:  # a replaced task gets its own again
                return memo[1]
        found = resolve_preprocess(self.model, name)
        with self._lock:
            self._preprocess[name] = (state, found)
        return found

    def _transform(self, preprocess: dict[str, Any]) -> Transform:
        from piggyback.preprocess import Preprocess

        key = preprocess_key(preprocess)
        with self._lock:
            if key not in self._transforms:
                self._transforms[key] = Preprocess.from_dict(preprocess).transform()
            return self._transforms[key]

    # -- memory ---------------------------------------------------------------------------------

    def memory(self) -> dict[str, Any]:
        """Bytes held: the backbone once, each loaded task (packed), the cached masked weights.

        A task counts its own storages (packed masks, head, norms, routing prototypes; scores if
        it is still trainable); the cache counts the masked weights it keeps.
        """
        backbone = _storage_bytes(self.model.backbone_tensors(exclude_head=True).values())
        tasks = {name: _storage_bytes(_task_tensors(self.model.task(name))) for name in self.tasks}
        cache = self.cache_info().bytes
        return {
            "backbone_bytes": backbone,
            "tasks": tasks,
            "tasks_bytes": sum(tasks.values()),
            "cache_bytes": cache,
            "total_bytes": backbone + sum(tasks.values()) + cache,
        }

    def cache_info(self) -> CacheInfo:
        """Hits, misses, evictions, cached tasks and bytes of the masked-weight cache."""
        return self.task_cache.info()

    # -- predicting -----------------------------------------------------------------------------

    def prepare(
        self, image: ImageInput, tasks: str | Sequence[str] = AUTO, *, keep_picture: bool = True
    ) -> PreparedImage:
        """`image` decoded and preprocessed for `tasks` (names, or "auto": every preprocessing
        routing may need), for `predict` to take as an image. Answers are the same with or
        without it; a server calls it in its decoding threads so that the thread running the
        network does nothing else (`benchmarks/serve_load.py`). `keep_picture=False` drops the
        decoded picture (then only `tasks` can be asked for it, as they were when prepared)."""
        names = as_task_list(tasks)
        self._assignment(names, len(names))  # unknown names fail here, not in the batch
        preprocesses = self._preprocesses(names)
        return prepare_image(image, preprocesses, self._transform, keep_picture=keep_picture)

    def _preprocesses(self, names: list[str]) -> list[dict[str, Any]]:
        """The preprocessing of each task named; with "auto", routing's and every task's."""
        if AUTO not in names:
            return [self.preprocess(name) for name in dict.fromkeys(names)]
        profiles = [self.model.task(name).routing for name in self.tasks]
        routing = [profile.preprocess for profile in profiles if profile is not None]
        return routing + [self.preprocess(name) for name in self.tasks]

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        tasks: str | Sequence[str] = AUTO,
        *,
        top_k: int = 5,
    ) -> list[TaskPrediction]:
        """The top-k classes of each image, from its task.

        `tasks`: one task name for all images, "auto" (each image routed to a task), or one entry
        per image (names and "auto" mixed). Images: PIL images, paths, bytes, preprocessed
        CHW / NCHW tensors (used as given), or `prepare`'s results. A mixed batch runs each task
        once on its images.
        """
        if (k := whole_number(top_k) or 0) < 1:
            raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
        top_k = k  # numpy integers too
        items = as_image_list(images)
        wanted = self._assignment(tasks, len(items))
        if self.batch_invariant and len(items) > 1:  # each image exactly as if it came alone
            pairs = zip(items, wanted, strict=True)
            return [self.predict([item], [task], top_k=top_k)[0] for item, task in pairs]
        prepared = PreparedImages(items, self._transform)
        results: list[TaskPrediction | None] = [None] * len(items)
        routes: dict[int, Route] = {}
        auto = [i for i, name in enumerate(wanted) if name == AUTO]
        if auto:
            routes, probabilities = self._route(prepared, auto)
            for index, route in routes.items():  # entropy routing already ran the chosen task
                if index in probabilities:
                    row, names = probabilities[index]
                    results[index] = self._answer(route.task, row, names, top_k, route)
        chosen = [routes[i].task if name == AUTO else name for i, name in enumerate(wanted)]
        for task, indices in _groups(chosen, skip={i for i, r in enumerate(results) if r}).items():
            probabilities, names = self._probabilities(task, prepared, indices)
            for index, row in zip(indices, probabilities, strict=True):
                results[index] = self._answer(task, row, names, top_k, routes.get(index))
        return results  # type: ignore[return-value]

    def predict_each(
        self,
        images: ImageInput | Sequence[ImageInput],
        task_names: Sequence[str],
        *,
        top_k: int = 5,
    ) -> list[list[TaskPrediction]]:
        """Several tasks' answers for every image: one list per image, in `task_names` order."""
        if isinstance(task_names, str):
            task_names = [task_names]
        items = as_image_list(images)
        per_task = [self.predict(items, name, top_k=top_k) for name in task_names]
        return [list(answers) for answers in zip(*per_task, strict=True)] if per_task else []

    def logits(self, batch: Tensor, task: str) -> Tensor:
        """The raw outputs of `task` for an already preprocessed NCHW batch."""
        return self._forward(batch, task)[0]

    def _forward(self, batch: Tensor, task: str) -> tuple[Tensor, list[str] | None]:
        """Outputs and class names of one task. Under the model's swap lock: the task cannot be
        replaced between looking up its cached tensors, applying them and reading its names."""
        model = self.model
        with torch.inference_mode(), model.swap_lock:
            state = model.task(task)
            tensors = self.task_cache.get(
                task, _sources(model, state), lambda: model.task_tensors(task)
            )
            with model.tensors_applied(task, tensors) as network:
                return network(network_batch(batch, model)), state.class_names

    def _assignment(self, tasks: str | Sequence[str], count: int) -> list[str]:
        wanted = [tasks] * count if isinstance(tasks, str) else as_task_list(tasks)
        if len(wanted) != count:
            raise TaskError(f"{len(wanted)} task names for {count} images: give one per image")
        known = set(self.tasks)
        unknown = sorted({name for name in wanted if name != AUTO and name not in known})
        if unknown:
            raise TaskError(f"unknown task(s) {unknown}; this predictor has tasks {self.tasks}")
        if AUTO in wanted and not known:
            raise TaskError("no task is loaded: nothing to route images to")
        return wanted

    def _probabilities(
        self, task: str, prepared: PreparedImages, indices: list[int]
    ) -> tuple[Tensor, list[str] | None]:
        batch = prepared.batch(indices, self.preprocess(task), f"task {task!r}")
        logits, names = self._forward(batch, task)
        return logits.float().softmax(dim=1).cpu(), names

    def _answer(
        self, task: str, row: Tensor, names: list[str] | None, top_k: int, route: Route | None
    ) -> TaskPrediction:
        names = class_names(names, row.numel(), task)
        values, classes = row.topk(min(top_k, row.numel()))
        top = [(names[c], v) for c, v in zip(classes.tolist(), values.tolist(), strict=True)]
        if route is None:
            return TaskPrediction(task, top)
        return TaskPrediction(task, top, route.confidence, routed=True, routed_by=route.method)

    # -- routing --------------------------------------------------------------------------------

    def _route(
        self, prepared: PreparedImages, indices: list[int]
    ) -> tuple[dict[int, Route], dict[int, tuple[Tensor, list[str] | None]]]:
        """A task for each image at `indices`; with entropy routing also its probabilities."""
        names = self.tasks
        profiles = {name: self.model.task(name).routing for name in names}
        missing = [name for name, profile in profiles.items() if profile is None]
        if not missing:
            features = self._routing_features(prepared, indices, profiles)
            return dict(zip(indices, route_by_prototypes(features, profiles), strict=True)), {}
        self._warn_fallback(missing)
        answers = {name: self._probabilities(name, prepared, indices) for name in names}
        routes = route_by_entropy({name: probs for name, (probs, _) in answers.items()})
        chosen = {
            index: (answers[route.task][0][row], answers[route.task][1])
            for row, (index, route) in enumerate(zip(indices, routes, strict=True))
        }
        return dict(zip(indices, routes, strict=True)), chosen

    def _routing_features(
        self, prepared: PreparedImages, indices: list[int], profiles: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Frozen-backbone features of the images, per distinct routing preprocessing."""
        by_key: dict[str, Tensor] = {}
        out = {}
        for name, profile in profiles.items():
            key = preprocess_key(profile.preprocess)
            if key not in by_key:
                batch = prepared.batch(indices, profile.preprocess, "routing")
                with torch.inference_mode():
                    features = self.model.backbone_features(network_batch(batch, self.model))
                by_key[key] = features.float().cpu()
            out[name] = by_key[key]
        return out

    def _warn_fallback(self, missing: list[str]) -> None:
        key = tuple(missing)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(
            f"task(s) {missing} have no routing prototypes (saved before routing existed, or "
            "built without training images), so 'auto' routes by prediction entropy, which is "
            "much less accurate; add prototypes with `piggyback route-fit MODEL_DIR --task NAME "
            "--data PATH`",
            NoRoutingProfileWarning,
            stacklevel=4,
        )


def _groups(chosen: list[str], skip: set[int]) -> dict[str, list[int]]:
    """Image indices by task, tasks in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, task in enumerate(chosen):
        if index not in skip:
            groups.setdefault(task, []).append(index)
    return groups


def _task_tensors(state: TaskState) -> list[Tensor]:
    """Everything a task holds: packed masks (or scores), head, norms, routing prototypes."""
    routing = [state.routing.prototypes] if state.routing is not None else []
    return [*state.parameters(), *state.buffers(), *routing]


def _sources(model: PiggybackModel, state: TaskState) -> list[object]:
    """What a task's swapped tensors are computed from: a cache entry is valid while these are
    the same objects, unchanged (see `TaskCache`)."""
    weights = [model.backbone_weight(target.name) for target in model.targets]
    return [state, *state.parameters(), *state.buffers(), *weights]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a view counts its whole storage once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
