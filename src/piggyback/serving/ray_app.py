"""Scaling out on Ray Serve: replicas that each hold the backbone and every task, behind Ray
Serve's HTTP proxy, answering through the same FastAPI app as `piggyback serve`.

Each replica builds `create_app` over its own engine (`serve.ingress()` with
`__serve_build_asgi_app__`, so the app is made on the replica, after the model is loaded) and
hands it Ray Serve's own dynamic batching (`@serve.batch`) in place of the in-process batcher.
Ray Serve spreads requests over the replicas; each batch runs in a worker thread so a replica's
event loop keeps accepting requests.

Start it with `piggyback serve MODEL_DIR --ray --replicas N`, or from Python / `serve run`:

    from piggyback.serving.ray_app import build
    app = build("models/lite0", replicas=2)   # a bound deployment: serve.run(app)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ray import serve

from piggyback.predictor import Predictor
from piggyback.serving.app import ServeSettings, create_app
from piggyback.serving.metrics import Metrics
from piggyback.serving.server import configure_process

__all__ = ["PiggybackDeployment", "build", "run_on_ray"]


@serve.deployment(name="piggyback")
@serve.ingress()
class PiggybackDeployment:
    """One replica: the model directory loaded once, its tasks answered in batches."""

    def __init__(
        self,
        model_dir: str,
        settings: dict[str, Any],
        device: str,
        threads: int | None,
        max_cached_tasks: int | None,
        batch_invariant: bool = False,
    ) -> None:
        configure_process(threads)
        self.engine = Predictor.from_pretrained(
            model_dir,
            device=device,
            max_cached_tasks=max_cached_tasks,
            batch_invariant=batch_invariant,
        )
        self.settings = ServeSettings(**settings)
        self.metrics = Metrics()
        self._predict_item.set_max_batch_size(self.settings.max_batch_size)
        self._predict_item.set_batch_wait_timeout_s(self.settings.batch_wait_ms(on_ray=True) / 1000)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.settings, submit=self._submit, metrics=self.metrics)

    async def _submit(self, images: Sequence[Any], tasks: Sequence[str], top_k: int) -> list:
        items = [
            self._predict_item((image, task, top_k))
            for image, task in zip(images, tasks, strict=True)
        ]
        return list(await asyncio.gather(*items))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict_item(self, items: list[tuple[Any, str, int]]) -> list:
        """Ray Serve gathers concurrent calls into `items`: one mixed-task forward pass."""
        images, tasks, top_ks = (list(column) for column in zip(*items, strict=True))
        started = time.perf_counter()
        answers = await asyncio.to_thread(self.engine.predict, images, tasks, top_k=max(top_ks))
        self.metrics.record_batch(len(items), time.perf_counter() - started)
        return [replace(a, top=a.top[:k]) for a, k in zip(answers, top_ks, strict=True)]


def build(
    model_dir: str | Path,
    settings: ServeSettings | None = None,
    *,
    replicas: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    max_cached_tasks: int | None = 4,
    batch_invariant: bool = False,
    num_cpus: float = 1.0,
):
    """The bound deployment (for `serve.run`): `replicas` copies, `num_cpus` each."""
    settings = settings or ServeSettings.with_env_key()
    options = {
        "num_replicas": replicas,
        "ray_actor_options": {
            "num_cpus": num_cpus,
            # One malloc arena from the replica's start (see runtime.tune_allocator): Ray's own
            # threads have arenas before the replica's code runs, which mallopt cannot undo.
            "runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "1"}},
        },
        # Enough requests in flight per replica for its batches to fill (Ray's default is 5).
        "max_ongoing_requests": 2 * settings.max_batch_size,
    }
    if device.startswith("cuda"):
        options["ray_actor_options"]["num_gpus"] = 1
    return PiggybackDeployment.options(**options).bind(
        str(Path(model_dir).resolve()),
        asdict(settings),
        device,
        threads,
        max_cached_tasks,
        batch_invariant,
    )


def run_on_ray(
    model_dir: str | Path,
    settings: ServeSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    max_cached_tasks: int | None = 4,
    batch_invariant: bool = False,
) -> None:
    """Start (or join) Ray, serve the model behind Ray Serve's proxy, and wait until Ctrl-C."""
    import ray

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    deployment = build(
        model_dir,
        settings,
        replicas=replicas,
        device=device,
        threads=threads,
        max_cached_tasks=max_cached_tasks,
        batch_invariant=batch_invariant,
    )
    serve.run(deployment, route_prefix="/")
    print(f"serving {model_dir} on Ray Serve at http://{host}:{port} ({replicas} replicas)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
