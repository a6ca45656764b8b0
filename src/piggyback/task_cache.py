"""An LRU cache of the tensors a task puts into the backbone (W * mask, for every masked weight),
kept by a `Predictor` for the tasks it serves (and, with room for one task, by the model itself
for its active task in eval mode).

Computing a task's masked weights costs about one forward pass (unpacking P bits and multiplying
P weights); keeping them costs 32 bits per weight, i.e. as much memory as the backbone. So the most
recently used tasks are kept up to a budget (a number of tasks and/or bytes), and the others stay
packed at 1 bit per weight until they are asked for again.

An entry is never served stale. It is looked up by task name and then checked against the very
objects it was computed from (the task, its mask tensors, the backbone weights; compared by
identity, and by version counter for in-place changes): a task that was replaced, reloaded or
trained further, or a backbone moved to another device, misses instead of returning old weights.
The entry holds references to those objects, so their ids cannot be reused by new ones while the
entry lives. `discard(name)` drops a deleted task at once, so its memory does not linger.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import Tensor


def _version(tensor: object) -> int:
    """The in-place version counter of a tensor (-1 for objects and inference tensors)."""
    try:
        return tensor._version  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # not a tensor, or an inference tensor (immutable)
        return -1


@dataclass(frozen=True)
class CacheInfo:
    """Counters and contents of a `TaskCache`, for monitoring and tests."""

    hits: int
    misses: int
    evictions: int
    tasks: list[str]  # cached tasks, least recently used first
    bytes: int  # memory held by cached tensors (shared tensors not counted)
    max_tasks: int | None
    max_bytes: int | None

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    sources: tuple[object, ...]  # strong references: their ids stay unique while the entry lives
    versions: tuple[int, ...]
    tensors: list[Tensor]
    nbytes: int = field(default=0)

    def matches(self, sources: Sequence[object]) -> bool:
        return (
            len(sources) == len(self.sources)
            and all(a is b for a, b in zip(sources, self.sources, strict=True))
            and tuple(_version(s) for s in sources) == self.versions
        )


def _new_bytes(tensors: Sequence[Tensor], sources: Sequence[object]) -> int:
    """Bytes of the storages the computed tensors own (not those they share with the sources)."""
    shared = {s.untyped_storage().data_ptr() for s in sources if isinstance(s, Tensor)}
    own: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in shared:
            own[storage.data_ptr()] = storage.nbytes()
    return sum(own.values())


class TaskCache:
    """Thread-safe LRU of computed task tensors, bounded by `max_tasks` and/or `max_bytes`.

    None means unbounded; `max_tasks=0` (or an entry larger than `max_bytes`) caches nothing, so
    every use recomputes. Computation happens outside the cache's lock.
    """

    def __init__(self, max_tasks: int | None = 1, max_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self.max_tasks: int | None = None
        self.max_bytes: int | None = None
        self.configure(max_tasks=max_tasks, max_bytes=max_bytes)

    def configure(self, *, max_tasks: int | None, max_bytes: int | None) -> None:
        """Set the budget; entries beyond it are evicted now (least recently used first)."""
        for name, value in (("max_tasks", max_tasks), ("max_bytes", max_bytes)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        with self._lock:
            self.max_tasks, self.max_bytes = max_tasks, max_bytes
            self._evict()

    def get(
        self, name: str, sources: Sequence[object], compute: Callable[[], list[Tensor]]
    ) -> list[Tensor]:
        """The tensors of task `name` computed from `sources`: cached, or computed and cached."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.matches(sources):
                self._entries.move_to_end(name)
                self.hits += 1
                return entry.tensors
            self.misses += 1
        versions = tuple(_version(s) for s in sources)  # before: a change while computing misses
        tensors = compute()
        entry = _Entry(tuple(sources), versions, tensors)
        entry.nbytes = _new_bytes(tensors, sources)
        with self._lock:
            self._entries.pop(name, None)
            self._entries[name] = entry
            self._evict()
        return tensors

    def discard(self, name: str) -> None:
        """Forget task `name` (deleted or replaced)."""
        with self._lock:
            self._entries.pop(name, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                tasks=list(self._entries),
                bytes=sum(e.nbytes for e in self._entries.values()),
                max_tasks=self.max_tasks,
                max_bytes=self.max_bytes,
            )

    def _evict(self) -> None:
        """Drop least recently used entries until the budget holds (caller holds the lock)."""

        def over() -> bool:
            count = len(self._entries)
            size = sum(e.nbytes for e in self._entries.values())
            return (self.max_tasks is not None and count > self.max_tasks) or (
                self.max_bytes is not None and size > self.max_bytes
            )

        while self._entries and over():
            self._entries.popitem(last=False)
            self.evictions += 1
