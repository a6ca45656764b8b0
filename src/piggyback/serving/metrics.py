"""Counters behind GET /metrics: requests by status, latency percentiles, batch sizes, per task.

Latencies are kept in fixed-size windows (the last `window` values), so a server that runs for
months holds the same few kilobytes and its percentiles describe recent traffic.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["Metrics"]


def _summary(values: Iterable[float]) -> dict[str, float | int]:
    """Count, mean and p50/p90/p99 of latencies in milliseconds (empty: count 0)."""
    data = np.fromiter(values, dtype=np.float64)
    if data.size == 0:
        return {"count": 0}
    p50, p90, p99 = np.percentile(data, [50, 90, 99]) * 1000
    return {
        "count": int(data.size),
        "mean_ms": round(float(data.mean()) * 1000, 3),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
    }


class Metrics:
    """Thread-safe: the batcher's worker thread and the event loop both record."""

    def __init__(self, window: int = 10_000) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self._window = window
        self._status: Counter[int] = Counter()
        self._latency: deque[float] = deque(maxlen=window)
        self._task_latency: dict[str, deque[float]] = {}
        self._task_requests: Counter[str] = Counter()
        self._batch_sizes: Counter[int] = Counter()
        self._batch_seconds: deque[float] = deque(maxlen=window)
        self._images = 0

    def record_response(self, status: int) -> None:
        with self._lock:
            self._status[status] += 1

    def record_prediction(self, tasks: Iterable[str], seconds: float, images: int) -> None:
        """One answered predict request: its latency, overall and for each task it answered."""
        with self._lock:
            self._latency.append(seconds)
            self._images += images
            for task in set(tasks):
                self._task_requests[task] += 1
                window = self._task_latency.setdefault(task, deque(maxlen=self._window))
                window.append(seconds)

    def record_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self._batch_sizes[size] += 1
            self._batch_seconds.append(seconds)

    def snapshot(self, queue_length: int = 0) -> dict[str, Any]:
        with self._lock:
            batches = sum(self._batch_sizes.values())
            items = sum(size * count for size, count in self._batch_sizes.items())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": {
                    "total": sum(self._status.values()),
                    "by_status": {str(k): v for k, v in sorted(self._status.items())},
                },
                "predict_latency": _summary(self._latency),
                "predictions": self._images,
                "queue_length": queue_length,
                "batches": {
                    "count": batches,
                    "items": items,
                    "mean_size": round(items / batches, 3) if batches else 0,
                    "max_size": max(self._batch_sizes, default=0),
                    "sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
                    "run_time": _summary(self._batch_seconds),
                },
                "tasks": {
                    task: {
                        "requests": self._task_requests[task],
                        "latency": _summary(self._task_latency[task]),
                    }
                    for task in sorted(self._task_requests)
                },
            }
