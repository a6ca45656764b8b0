"""The HTTP API as a FastAPI app: one backbone answering every task, batched across clients.

`create_app(predictor, settings)` is used as is by `piggyback serve` (uvicorn, one process, the
`DynamicBatcher`) and by the Ray Serve deployment (`ray_app`), which passes its own `submit`
built on Ray Serve's batching instead. Routes: the page (/), /health, /v1/tasks, /v1/predict,
/metrics and the generated OpenAPI docs (/docs, /openapi.json).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import cache
from importlib.resources import files
from typing import Any, Protocol

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from piggyback import __version__
from piggyback.routing import AUTO
from piggyback.runtime import available_cores
from piggyback.serving.batching import DynamicBatcher, OverloadedError
from piggyback.serving.decoding import decoded_images
from piggyback.serving.inputs import (
    PredictInput,
    RequestError,
    listed,
    read_predict_request,
)
from piggyback.serving.metrics import Metrics
from piggyback.serving.middleware import BearerAuth, BodyLimit, CountResponses, error_response
from piggyback.serving.schemas import (
    ErrorResponse,
    Health,
    PredictJSON,
    PredictResponse,
    TasksResponse,
)
from piggyback.serving.settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app"]


class Engine(Protocol):
    """What the API needs from the model: a `piggyback.Predictor` (or a stand-in)."""

    @property
    def tasks(self) -> list[str]: ...

    def task_description(self, name: str) -> dict[str, Any]: ...

    def predict(self, images: list, tasks: list[str], *, top_k: int) -> list:
        """One `TaskPrediction` per image; `tasks[i]` is a task name or "auto"."""
        ...

    def prepare(self, image: Any, tasks: list[str], *, keep_picture: bool = True) -> Any:
        """Optional: the image preprocessed for `tasks` ahead of `predict` (in a request
        thread); an engine without it gets decoded pictures."""
        ...


#: (images, tasks, top_k) -> answers, awaited; the DynamicBatcher's or Ray Serve's batching.
Submit = Callable[[Sequence[Any], Sequence[str], int], Awaitable[list[Any]]]

#: Paths answered without a token: the health check, and the page, a static shell that holds no
#: data (it asks for the token and sends it with every API call).
PUBLIC_PATHS = ("/health", "/")


@cache
def page_html() -> str:
    return files("piggyback.serving").joinpath("page/index.html").read_text(encoding="utf-8")


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Bad input: not an image, truncated, empty, bad base64/JSON/top_k, unknown task.",
        401: "Missing or wrong bearer token (when the server has one).",
        413: "Upload, image (pixels) or number of predictions over the server's limits.",
        415: "Neither multipart/form-data nor application/json.",
        503: "Too many predictions waiting: retry later.",
    }.items()
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "task": {"type": "string", "default": AUTO},
                        "top_k": {"type": "integer", "default": 5, "minimum": 1},
                    },
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}


def create_app(
    engine: Engine,
    settings: ServeSettings | None = None,
    *,
    submit: Submit | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The API over `engine`; without `submit`, requests are batched by a DynamicBatcher
    (its wait depends on where the engine runs: `engine.device`, CPU when it does not say)."""
    settings = settings or ServeSettings()
    metrics = metrics or Metrics()
    batcher: DynamicBatcher | None = None
    decoding = CapacityLimiter(settings.decode_threads or available_cores())
    device = str(getattr(engine, "device", "cpu"))
    wait_ms = settings.batch_wait_ms(device=device, on_ray=submit is not None)
    arriving = _Arriving(fresh_s=wait_ms / 1000)  # requests being decoded, not yet submitted
    if submit is None:
        batcher = DynamicBatcher(
            _positional(engine),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=wait_ms,
            on_batch=metrics.record_batch,
            pending=arriving.value,
            wait_from=_least_batch_worth_waiting(engine, device),
        )
        arriving.on_leave = batcher.pending_changed
        submit = batcher.submit

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if batcher is not None:
            await batcher.start()
        try:
            yield
        finally:
            if batcher is not None:
                await batcher.stop()

    app = FastAPI(
        title="piggyback",
        version=__version__,
        summary="One frozen backbone answering many image classification tasks.",
        description="POST an image to /v1/predict with a task name, several, or 'auto'. "
        "With an API key, send `Authorization: Bearer <key>` to every route but /health.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    _add_error_handlers(app)
    _add_routes(app, engine, settings, metrics, submit, batcher, arriving, decoding)
    app.add_middleware(
        BodyLimit,
        max_bytes=int(settings.max_upload_mb * 2**20),
        timeout_s=settings.body_timeout_s,
    )
    if settings.api_key:
        app.add_middleware(BearerAuth, api_key=settings.api_key, public=PUBLIC_PATHS)
    app.add_middleware(CountResponses, record=metrics.record_response)  # outermost: counts all
    return app


def _positional(engine: Engine) -> Callable[[list, list[str], int], list]:
    return lambda images, tasks, top_k: engine.predict(images, tasks, top_k=top_k)


def _add_routes(
    app: FastAPI,
    engine: Engine,
    settings: ServeSettings,
    metrics: Metrics,
    submit: Submit,
    batcher: DynamicBatcher | None,
    arriving: _Arriving,
    decoding: CapacityLimiter,
) -> None:
    known = set(engine.tasks)

    # GET and HEAD (undocumented): load balancers and uptime checks often probe with HEAD.
    @app.api_route(
        "/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False
    )
    def page() -> str:
        return page_html()

    @app.head("/health", include_in_schema=False)
    @app.get("/health", response_model=Health, tags=["server"])
    def health() -> dict[str, Any]:
        """Liveness: answers without a token."""
        return {"status": "ok", "tasks": len(known)}

    @app.get("/v1/tasks", response_model=TasksResponse, responses=_ERRORS, tags=["predict"])
    def tasks() -> dict[str, Any]:
        """The tasks served, with their classes and metadata (preprocessing, results)."""
        return {"tasks": [_task_info(engine.task_description(name)) for name in engine.tasks]}

    @app.get("/metrics", tags=["server"], responses=_ERRORS)
    def metrics_route() -> dict[str, Any]:
        """Requests by status, predict latency percentiles, batch sizes, per-task counts."""
        return metrics.snapshot(queue_length=batcher.waiting if batcher else 0)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_PREDICT_BODY,
        tags=["predict"],
    )
    async def predict(request: Request) -> dict[str, Any]:
        """Top-k classes of the image(s) for each task asked (a name, several, or 'auto').

        Multipart: file field `image` (repeat for several), `task`, `top_k`. JSON: `image`
        (base64), `task` (a name or a list), `top_k`. One result per image and task.
        """
        started = time.perf_counter()
        data = await _read_checked(request, settings, known, decoding)
        # Counted as arriving (batches wait for it) once its body is in, not while uploading:
        # a stalled upload made every batch wait --max-wait-ms.
        with arriving.holding(len(data.images) * len(data.tasks)):
            images = await decoded_images(data, engine, settings.max_image_pixels, decoding)
        if await request.is_disconnected():  # a client that gave up (a timeout): no batch work
            raise RequestError(400, "client_disconnected", "the client left before its answer")
        pairs = [(i, task) for i in range(len(images)) for task in data.tasks]
        answers = await submit([images[i] for i, _ in pairs], [t for _, t in pairs], data.top_k)
        results = [
            _result(i, asked, answer) for (i, asked), answer in zip(pairs, answers, strict=True)
        ]
        metrics.record_prediction(
            [r["task"] for r in results], time.perf_counter() - started, len(images)
        )
        return {"results": results}


async def _read_checked(
    request: Request, settings: ServeSettings, known: set[str], decoding: CapacityLimiter
) -> PredictInput:
    """The encoded images, tasks and top_k of a predict request, checked against the limits.
    Large JSON bodies are parsed in the decoding threads (`decoding`), not anyio's shared pool
    of 40 that FastAPI's own routes (/health) run in."""
    data = await read_predict_request(
        request, default_top_k=settings.default_top_k, limiter=decoding
    )
    unknown = [t for t in data.tasks if t != AUTO and t not in known]
    if unknown:
        raise RequestError(
            400,
            "unknown_task",
            f"unknown task {listed(unknown)}: this server has {sorted(known)} (or 'auto')",
        )
    count = len(data.images) * len(data.tasks)
    if count > settings.max_batch_size:
        raise RequestError(
            413,
            "too_many_predictions",
            f"{len(data.images)} image(s) x {len(data.tasks)} task(s) = {count} predictions, "
            f"more than the limit of {settings.max_batch_size} per request "
            "(--max-batch-size): split the request",
        )
    return data


class _Arriving:
    """The predictions (images x tasks) of requests being decoded, which a batch may wait for
    (one event loop: no lock needed). A request counts for its first `fresh_s` seconds: one slow
    to decode (a 20 MP photo takes 180 ms) then holds the batches gathered meanwhile, not every
    batch until it is done. `on_leave()` is called as each request leaves (the batcher re-checks
    whom it waits for)."""

    def __init__(self, fresh_s: float) -> None:
        self.fresh_s = fresh_s
        self.on_leave: Callable[[], None] | None = None
        self._holders: dict[object, tuple[int, float]] = {}  # -> (predictions, since)

    def value(self) -> int:
        since = time.monotonic() - self.fresh_s
        return sum(count for count, began in self._holders.values() if began >= since)

    @contextmanager
    def holding(self, count: int) -> Iterator[None]:
        key = object()
        self._holders[key] = (count, time.monotonic())
        try:
            yield
        finally:
            del self._holders[key]
            if self.on_leave is not None:
                self.on_leave()


def _least_batch_worth_waiting(engine: Engine, device: str) -> int:
    """How many images a batch must reach, with the requests being decoded, for waiting for them
    to pay. On CPU, a batch below `engine.every_core_from` (ThreadsPerBatch: 8 images when
    larger batches get more threads) runs on fewer threads than there are cores and leaves one
    to the decoding threads: running it at once overlaps with their work, and waiting only adds
    latency (measured, 3 clients sending 2000x1500 JPEGs: p50 96-98 ms waiting, 83-86 not; a 20
    MP upload being decoded held 3 small clients' batches for the whole wait: 94-116 ms against
    52). A batch from that size takes every core, and starting it while others decode gains
    nothing (see settings.CPU_MAX_WAIT_MS)."""
    return getattr(engine, "every_core_from", 1) if device.startswith("cpu") else 1


def _task_info(description: dict[str, Any]) -> dict[str, Any]:
    """A Predictor's task description as the API's TaskInfo (name, classes, the rest metadata)."""
    main = {"task", "num_classes", "classes"}
    return {
        "name": description["task"],
        "num_classes": description["num_classes"],
        "classes": description["classes"],
        "metadata": {k: v for k, v in description.items() if k not in main},
    }


def _result(image: int, asked: str, answer: Any) -> dict[str, Any]:
    return {
        "image": image,
        "task": answer.task,
        "requested": asked,
        "routing_confidence": answer.confidence if answer.routed else None,
        "routed_by": getattr(answer, "routed_by", None) if answer.routed else None,
        "predictions": [{"label": label, "probability": p} for label, p in answer.top],
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": {"code", "message"}}; never a traceback to the client."""

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(OverloadedError)
    async def overloaded(_: Request, error: OverloadedError):
        return error_response(503, "overloaded", str(error), **{"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        headers = dict(error.headers or {})
        if error.status_code == 405:  # Starlette names only the first route of the path
            headers["Allow"] = _allowed_methods(request)
        return error_response(error.status_code, code, str(error.detail), **headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        return error_response(400, "bad_request", str(error.errors()))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception):
        return error_response(500, "internal_error", f"prediction failed: {type(error).__name__}")


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on this path (GET and HEAD /health are two routes)."""
    methods = {
        method
        for route in request.app.router.routes
        if route.matches(request.scope)[0] != Match.NONE
        for method in getattr(route, "methods", None) or ()
    }
    return ", ".join(sorted(methods))
