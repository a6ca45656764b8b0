"""Running the API in one process with uvicorn: what `piggyback serve` does.

Threads are sized on purpose. The worker thread that runs the batches gets `threads` intra-op
threads and one inter-op thread; by default one core fewer than the process may use (at least
one), because the remaining core is busy too: the event loop parses requests and the decoding
threads decode images while a batch runs. Left alone, torch would spin a thread on every core
and fight the decoding for them (on 2 cores, 2 OpenMP threads competing with other work slow
each other down many times over). A large batch is different: the requests it answers have
been read and decoded already, and its forward pass is what every client waits for, so it gets
`batch_threads` from 8 images, by default every core (`ThreadsPerBatch`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from piggyback.runtime import available_cores
from piggyback.serving.app import Engine, ServeSettings, create_app
from piggyback.serving.sockets import bound_sockets, close_all, listen_all, url_of

__all__ = [
    "ThreadsPerBatch",
    "available_cores",
    "configure_process",
    "default_threads",
    "running_server",
    "serve",
]


def default_threads() -> int:
    """Torch threads of the inference worker unless told: one core fewer than available, >= 1."""
    return max(1, available_cores() - 1)


def configure_process(threads: int | None) -> int:
    """Set up a serving process before its first forward pass: torch's thread pools, and the
    allocator; returns the intra-op thread count.

    The allocator as the `piggyback` command sets it (`runtime.tune_allocator`): without it,
    glibc returns each batch's activations to the kernel and page-faults them in again on the
    next batch. Measured (Lite0, 128 px, 1 thread, batch 32): 11.0 ms per image against 6.6.
    Ray Serve replicas are processes of their own, which the command's setup never reaches.
    """
    from piggyback.runtime import tune_allocator

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    tune_allocator()
    count = threads or default_threads()
    torch.set_num_threads(count)
    # Only possible before torch's first parallel work in this process; otherwise keep it.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return count


class ThreadsPerBatch:
    """The engine, with torch's intra-op threads set before each batch by its size: `small`
    below `large_from` images, `large` from it (the batcher runs one batch at a time).

    Measured on 2 cores (`benchmarks/serve_load.py`, 4 Lite0 tasks, 3 interleaved runs, requests
    per second), 1 thread for small batches and 2 from `large_from` images, against 1 always:
    from 8: 76 vs 73 at 8 clients, 92 vs 88 at 32; from 4: 54 at 8 clients (batches of about 4
    then run on 2 threads that the event loop also needs), 97 at 32. 2 threads always: 49
    against 52 at 1 client.
    """

    def __init__(self, engine: Engine, *, small: int, large: int, large_from: int = 8) -> None:
        if small < 1 or large < 1:
            raise ValueError(f"--threads and --batch-threads must be >= 1, got {small}, {large}")
        if getattr(engine, "batch_invariant", False):
            large = small  # an image alone and in a batch: the same kernels, the same threads
        self.engine, self.small, self.large, self.large_from = engine, small, large, large_from

    @property
    def tasks(self) -> list[str]:
        return self.engine.tasks

    @property
    def device(self) -> Any:
        return getattr(self.engine, "device", "cpu")

    @property
    def every_core_from(self) -> int:
        """The least batch that runs on every core (1: they all do)."""
        return self.large_from if self.large > self.small else 1

    def task_description(self, name: str) -> dict[str, Any]:
        return self.engine.task_description(name)

    def prepare(self, image: Any, tasks: list[str], *, keep_picture: bool = True) -> Any:
        return self.engine.prepare(image, tasks, keep_picture=keep_picture)

    def predict(self, images: list, tasks: list[str], *, top_k: int) -> list:
        large = len(images) >= self.large_from and self.large != self.small
        if torch.get_num_threads() != self.small or large:
            torch.set_num_threads(self.large if large else self.small)
        try:
            return self.engine.predict(images, tasks, top_k=top_k)
        finally:
            if large:  # torch's default for threads started meanwhile (the request threads'
                torch.set_num_threads(self.small)  # preprocessing) goes back to the small count


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    threads: int | None = None,
    batch_threads: int | None = None,
    max_cached_tasks: int | None = 4,
    batch_invariant: bool = False,
    settings: ServeSettings | None = None,
    log_level: str = "info",
) -> None:
    """Load the model directory and answer HTTP requests until interrupted
    (`batch_invariant`: see `Predictor`; `threads`, `batch_threads`: see the module's doc)."""
    import uvicorn

    from piggyback.device import resolve_device
    from piggyback.model_dir import read_model_config
    from piggyback.predictor import Predictor

    if batch_threads is not None and batch_threads < 1:
        raise ValueError(f"--batch-threads must be >= 1, got {batch_threads}")
    device = str(resolve_device(device))  # "auto": said as where it runs
    count = configure_process(threads)
    read_model_config(Path(model_dir))  # a wrong directory is named before the port is bound
    sockets = bound_sockets(host, port)  # a taken port or a bad address: before loading
    try:
        predictor = Predictor.from_pretrained(
            model_dir,
            device=device,
            max_cached_tasks=max_cached_tasks,
            batch_invariant=batch_invariant,
        )
        settings = settings or ServeSettings.with_env_key()
        engine = ThreadsPerBatch(predictor, small=count, large=batch_threads or available_cores())
        threading_note = f"{count} torch thread(s)"
        if engine.large != engine.small and settings.max_batch_size >= engine.large_from:
            threading_note += f", {engine.large} for batches of {engine.large_from} or more"
        listen_all(sockets, host, port)  # the model is ready: clients may connect
        print(
            f"serving {len(predictor.tasks)} task(s) of {model_dir} on {url_of(host, sockets)} "
            f"({device}, {threading_note}{', batch-invariant' if batch_invariant else ''}; "
            "API docs at /docs)",
            flush=True,
        )
        config = uvicorn.Config(
            create_app(engine, settings),
            log_level=log_level,
            access_log=False,
            # Ctrl-C / SIGTERM: requests in flight get this long to finish (one stalled upload
            # otherwise kept the server up until SIGKILL).
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        # uvicorn re-raises the Ctrl-C it handled once the server has shut down (uvicorn.run,
        # which cannot take bound sockets, swallows it the same way).
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=sockets)
    finally:
        close_all(sockets)


#: Seconds requests in flight get to finish after Ctrl-C or SIGTERM.
SHUTDOWN_GRACE_S = 10


@contextlib.contextmanager
def running_server(app, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields its URL (`port=0`: a free port).

    For tests, notebooks and benchmarks that need a real HTTP server in this process.
    """
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
