"""Dynamic batching: requests from many clients answered by one forward pass per batch.

A backbone forward pass over 16 images costs far less than 16 passes over one (the weights are
read once, the matrix products are larger), so the server gathers what arrives within
`max_wait_ms` of the first waiting request, up to `max_batch_size` images, whatever their tasks
(`Predictor.predict` runs a mixed-task batch once per task). While a batch runs, the next one
fills up, so under load batches grow by themselves. The wait is only paid when a request is on
its way (`pending()`: accepted, still being read or decoded): a lone client never waits.

Inference runs in one worker thread: the event loop keeps accepting, decoding, preprocessing
and answering requests meanwhile, and one forward pass at a time gets all of torch's threads
(two passes at once would only take turns on the model's weight-swap lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from piggyback.errors import PiggybackError

__all__ = ["DynamicBatcher", "OverloadedError"]

#: (images, tasks, top_k) -> one answer per image; see `piggyback.Predictor.predict`.
BatchFunction = Callable[[list[Any], list[str], int], list[Any]]


class OverloadedError(PiggybackError):
    """More requests wait than the queue holds: the client should retry later (HTTP 503)."""


@dataclass
class _Item:
    image: Any
    task: str
    top_k: int
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Queue of (image, task) items, run `max_batch_size` at a time by `infer` in a thread.

    `on_batch(size, seconds)` is called after each batch (metrics). `pending()`: how many
    items are on their way to `submit` (None: unknown, always wait up to max_wait); a batch
    waits for them only if, with them, it would hold at least `wait_from` items. Call
    `pending_changed()` when one leaves, submitted or not (its image failed to decode), so
    that a batch waiting for it starts then. Start with `start()` inside the running event
    loop; `stop()` fails every request not answered yet with OverloadedError, those of the
    batch in flight included (its forward pass ends in its thread, which stop() waits for).
    """

    def __init__(
        self,
        infer: BatchFunction,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        pending: Callable[[], int] | None = None,
        wait_from: int = 1,
    ) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch_size must be >= 1 and max_wait_ms >= 0, "
                f"got {max_batch_size} and {max_wait_ms}"
            )
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue if max_queue is not None else 64 * max_batch_size
        self.on_batch = on_batch
        self.pending = pending
        self.wait_from = wait_from
        self._queue: asyncio.Queue[_Item] | None = None
        self._pending_changed: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue, self._pending_changed = asyncio.Queue(), asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piggyback-infer")
        self._worker = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue is not None:
            waiting = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            _fail(waiting, OverloadedError("the server is shutting down"))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown)  # the loop answers meanwhile
        self._worker = self._queue = self._executor = self._pending_changed = None

    def pending_changed(self) -> None:
        """A request on its way left (submitted, or failed): the waiting batch re-checks."""
        if self._pending_changed is not None:
            self._pending_changed.set()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, images: Sequence[Any], tasks: Sequence[str], top_k: int) -> list[Any]:
        """Answers for `images[i]` with `tasks[i]`, once the batches holding them have run."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if self._queue.qsize() + len(images) > self.max_queue:
            raise OverloadedError(
                f"{self._queue.qsize()} predictions are waiting (limit {self.max_queue}): "
                "retry later"
            )
        loop = asyncio.get_running_loop()
        items = [
            _Item(image, task, top_k, loop.create_future())
            for image, task in zip(images, tasks, strict=True)
        ]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _run_forever(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._collect(self._queue)
            await self._run(batch)

    async def _collect(self, queue: asyncio.Queue[_Item]) -> list[_Item]:
        """The first waiting item and what follows within max_wait, up to max_batch_size."""
        batch = [await queue.get()]
        deadline = time.monotonic() + self.max_wait
        try:
            while len(batch) < self.max_batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._worth_waiting(len(batch)):
                    break  # out of time, or too few on the way: waiting would only add latency
                await self._next_item(queue, remaining, batch)
        except asyncio.CancelledError:  # stop(): back in the queue, whose items stop() fails
            for item in batch:
                queue.put_nowait(item)
            raise
        return [item for item in batch if not item.future.done()]  # drop cancelled clients

    def _worth_waiting(self, size: int) -> bool:
        if self.pending is None:
            return True
        on_the_way = self.pending()
        reachable = min(size + on_the_way, self.max_batch_size)  # a batch ends at the limit
        return on_the_way > 0 and reachable >= self.wait_from

    async def _next_item(
        self, queue: asyncio.Queue[_Item], timeout: float, batch: list[_Item]
    ) -> None:
        """Add the next item to `batch`; give up after `timeout` or when `pending_changed()` is
        called (a request the batch waited for failed: without this, it waited all of max_wait)."""
        assert self._pending_changed is not None
        self._pending_changed.clear()
        getter = asyncio.ensure_future(queue.get())
        changed = asyncio.ensure_future(self._pending_changed.wait())
        try:
            first = asyncio.FIRST_COMPLETED
            await asyncio.wait((getter, changed), timeout=timeout, return_when=first)
        finally:
            changed.cancel()
            if not getter.done():
                getter.cancel()  # asyncio.Queue.get leaves the item queued when cancelled
            elif not getter.cancelled():  # even when cancelled itself: the item is in hand
                batch.append(getter.result())

    async def _run(self, batch: list[_Item]) -> None:
        if not batch:
            return
        top_k = max(item.top_k for item in batch)
        images = [item.image for item in batch]
        tasks = [item.task for item in batch]
        started = time.perf_counter()
        try:
            answers = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.infer, images, tasks, top_k
            )
        except asyncio.CancelledError:  # stop(): the pass ends in its thread, unanswered
            _fail(batch, OverloadedError("the server is shutting down"))
            raise
        except Exception as error:  # reported to every waiting client, the loop goes on
            _fail(batch, error)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - started)
        for item, answer in zip(batch, answers, strict=True):
            if not item.future.done():
                item.future.set_result(_truncated(answer, item.top_k))


def _fail(items: list[_Item], error: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)


def _truncated(answer: Any, top_k: int) -> Any:
    """The answer with its `top` cut to the item's own top_k (the batch ran the largest)."""
    if len(answer.top) <= top_k:
        return answer
    return replace(answer, top=answer.top[:top_k])
