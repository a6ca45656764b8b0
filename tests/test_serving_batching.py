"""The dynamic batcher: gathering concurrent requests, mixed tasks, the wait bound, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from piggyback.serving.batching import DynamicBatcher, OverloadedError


@dataclass(frozen=True)
class Echo:
    task: str
    top: list[tuple[str, float]]


class RecordingInfer:
    """Answers each image with its own value; records every batch and the thread it ran in."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.batches: list[tuple[list, list[str], int]] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, images: list, tasks: list[str], top_k: int) -> list[Echo]:
        self.batches.append((list(images), list(tasks), top_k))
        self.threads.add(threading.current_thread().name)
        if self.fail_on in tasks:
            raise RuntimeError("engine failed")
        time.sleep(self.delay)
        return [
            Echo(t, [(f"{t}:{i}:{k}", 1.0 / (k + 1)) for k in range(top_k)])
            for i, t in zip(images, tasks, strict=True)
        ]


async def _with_batcher(infer, coroutine, **options):
    batcher = DynamicBatcher(infer, **options)
    await batcher.start()
    try:
        return await coroutine(batcher)
    finally:
        await batcher.stop()


def run(infer, coroutine, **options):
    return asyncio.run(_with_batcher(infer, coroutine, **options))


async def lone_request_seconds(batcher) -> float:
    """How long one request of one image took to be answered."""
    started = time.perf_counter()
    await batcher.submit([0], ["a"], 1)
    return time.perf_counter() - started


def test_concurrent_requests_are_gathered_into_batches_of_at_most_max_batch_size():
    infer = RecordingInfer(delay=0.02)

    async def clients(batcher):
        return await asyncio.gather(*(batcher.submit([i], ["a"], 1) for i in range(10)))

    answers = run(infer, clients, max_batch_size=4, max_wait_ms=50)
    assert [a[0].top[0][0] for a in answers] == [f"a:{i}:0" for i in range(10)]
    assert [len(images) for images, _, _ in infer.batches] == [4, 4, 2]


def test_one_batch_holds_several_tasks_and_each_answer_goes_back_to_its_request():
    infer = RecordingInfer()

    async def clients(batcher):
        return await asyncio.gather(
            batcher.submit([0, 1], ["flowers", "signs"], 1), batcher.submit([2], ["auto"], 1)
        )

    first, second = run(infer, clients, max_batch_size=8, max_wait_ms=50)
    assert infer.batches == [([0, 1, 2], ["flowers", "signs", "auto"], 1)]
    assert [a.task for a in first] == ["flowers", "signs"] and second[0].task == "auto"
    assert first[1].top == [("signs:1:0", 1.0)]


def test_a_lone_request_waits_about_max_wait_not_for_a_full_batch():
    infer = RecordingInfer()

    elapsed = run(infer, lone_request_seconds, max_batch_size=64, max_wait_ms=30)
    assert 0.025 <= elapsed < 2.0
    assert len(infer.batches) == 1


def test_each_request_gets_its_own_top_k_from_a_batch_run_with_the_largest():
    infer = RecordingInfer()

    async def clients(batcher):
        return await asyncio.gather(batcher.submit([0], ["a"], 1), batcher.submit([1], ["a"], 3))

    small, large = run(infer, clients, max_batch_size=8, max_wait_ms=50)
    assert infer.batches[0][2] == 3
    assert len(small[0].top) == 1 and len(large[0].top) == 3


def test_inference_runs_in_a_worker_thread_so_the_event_loop_keeps_running():
    infer = RecordingInfer(delay=0.3)

    async def busy(batcher):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await batcher.submit([0], ["a"], 1)
        task.cancel()
        return ticks

    ticks = run(infer, busy, max_batch_size=1, max_wait_ms=0)
    assert ticks >= 10  # the loop ticked while the 0.3 s batch ran
    assert infer.threads and threading.main_thread().name not in infer.threads


def test_a_failing_batch_fails_its_requests_and_later_batches_still_run():
    infer = RecordingInfer(fail_on="broken")

    async def clients(batcher):
        with pytest.raises(RuntimeError, match="engine failed"):
            await batcher.submit([0], ["broken"], 1)
        return await batcher.submit([1], ["fine"], 1)

    answer = run(infer, clients, max_batch_size=4, max_wait_ms=1)
    assert answer[0].task == "fine"


def test_a_full_queue_refuses_new_work_with_overloaded_error():
    infer = RecordingInfer(delay=0.2)

    async def flood(batcher):
        first = asyncio.create_task(batcher.submit([0, 1], ["a", "a"], 1))
        await asyncio.sleep(0.05)  # the first batch is running, the queue is empty again
        waiting = asyncio.create_task(batcher.submit([2, 3, 4], ["a"] * 3, 1))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError, match="retry later"):
            await batcher.submit([5, 6], ["a", "a"], 1)
        return await first, await waiting

    first, waiting = run(infer, flood, max_batch_size=2, max_wait_ms=0, max_queue=4)
    assert len(first) == 2 and len(waiting) == 3


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(RecordingInfer(), max_batch_size=0)


def test_a_lone_request_does_not_wait_when_no_other_request_is_on_its_way():
    infer = RecordingInfer()
    on_the_way = [0]

    batcher_options = {"max_batch_size": 64, "max_wait_ms": 1000, "pending": lambda: on_the_way[0]}
    assert run(infer, lone_request_seconds, **batcher_options) < 0.5  # did not wait the 1 s
    on_the_way[0] = 1  # a request still being read: worth waiting for (here in vain)
    assert run(infer, lone_request_seconds, **batcher_options) >= 0.9


def test_a_batch_waits_only_if_the_requests_on_their_way_bring_it_to_wait_from():
    infer = RecordingInfer()

    options = {"max_batch_size": 64, "max_wait_ms": 1000, "pending": lambda: 2}
    # 1 + 2 on the way: below 8, not worth waiting for; reaching 3, waited for (in vain)
    assert run(infer, lone_request_seconds, wait_from=8, **options) < 0.5
    assert run(infer, lone_request_seconds, wait_from=3, **options) >= 0.9
    # batches of at most 2 never reach 3, however many are on their way
    many = {**options, "pending": lambda: 10, "max_batch_size": 2}
    assert run(infer, lone_request_seconds, wait_from=3, **many) < 0.5


def test_a_batch_stops_waiting_when_the_request_it_waits_for_gives_up():
    infer = RecordingInfer()
    on_the_way = [1]  # a request being decoded, which will fail

    async def one_and_a_failure(batcher):
        async def fail_soon():
            await asyncio.sleep(0.1)
            on_the_way[0] = 0
            batcher.pending_changed()

        started = time.perf_counter()
        await asyncio.gather(batcher.submit([0], ["a"], 1), fail_soon())
        return time.perf_counter() - started

    options = {"max_batch_size": 64, "max_wait_ms": 3000, "pending": lambda: on_the_way[0]}
    assert run(infer, one_and_a_failure, **options) < 1.5  # not the 3 s of max_wait
    assert [images for images, _, _ in infer.batches] == [[0]]


def test_stopping_while_a_batch_waits_fails_its_requests_instead_of_leaving_them_hanging():
    async def stopped_while_waiting():
        batcher = DynamicBatcher(
            RecordingInfer(), max_batch_size=8, max_wait_ms=60_000, pending=lambda: 1
        )
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([0], ["a"], 1))
        await asyncio.sleep(0.05)  # collected; its batch waits for the request on its way
        second = asyncio.ensure_future(batcher.submit([1], ["a"], 1))
        await asyncio.sleep(0.05)  # joined the waiting batch
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)

    answers = asyncio.run(stopped_while_waiting())
    assert [type(a) for a in answers] == [OverloadedError, OverloadedError]
    assert all("shutting down" in str(a) for a in answers)


def test_stopping_while_a_batch_runs_fails_its_requests_once_its_pass_ends():
    async def stopped_while_running():
        batcher = DynamicBatcher(RecordingInfer(delay=0.3), max_batch_size=8, max_wait_ms=0)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit([0], ["a"], 1))
        await asyncio.sleep(0.1)  # its forward pass has started
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 5)

    [answer] = asyncio.run(stopped_while_running())
    assert isinstance(answer, OverloadedError) and "shutting down" in str(answer)


def test_large_batches_get_their_own_torch_thread_count_and_small_ones_the_default():
    import torch

    from piggyback.serving.server import ThreadsPerBatch

    class Engine:
        def __init__(self) -> None:
            self.tasks, self.seen = ["a"], []

        def predict(self, images, tasks, *, top_k):
            self.seen.append(torch.get_num_threads())
            return list(images)

    before = torch.get_num_threads()
    engine = Engine()
    threaded = ThreadsPerBatch(engine, small=1, large=2, large_from=4)
    try:
        for size in (1, 3, 4, 8, 2):
            assert threaded.predict(list(range(size)), ["a"] * size, top_k=1) == list(range(size))
    finally:
        torch.set_num_threads(before)
    assert engine.seen == [1, 1, 2, 2, 1]
    assert threaded.tasks == ["a"]
    threaded.predict(list(range(8)), ["a"] * 8, top_k=1)
    assert torch.get_num_threads() == 1  # the default for threads started later: small again
    torch.set_num_threads(before)
    engine.batch_invariant = True  # an image alone and in a batch must run on the same threads
    assert ThreadsPerBatch(engine, small=1, large=2).large == 1
    with pytest.raises(ValueError, match="must be >= 1, got 1, -1"):
        ThreadsPerBatch(engine, small=1, large=-1)


def test_a_serving_process_tunes_the_allocator_and_sizes_torch_threads(monkeypatch):
    import torch

    from piggyback.serving.server import configure_process

    calls = []
    monkeypatch.setattr("piggyback.runtime.tune_allocator", lambda: calls.append(1) or True)
    before = torch.get_num_threads()
    try:
        assert configure_process(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert calls == [1]  # Ray Serve replicas call it too: the CLI's own setup never runs there
