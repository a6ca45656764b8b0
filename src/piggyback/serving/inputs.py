"""Reading a predict request (multipart upload or JSON with base64) into images and tasks.

Everything a client can get wrong is reported as a `RequestError` with an HTTP status, a short
machine-readable code and a sentence saying what was wrong and what to send instead. Images are
decoded with a pixel limit checked on the header, before any pixel is decoded, so a small file
announcing a gigapixel image (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from anyio import CapacityLimiter, to_thread
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from piggyback.errors import ImageError, ImageTooLargeError
from piggyback.images import decode_image
from piggyback.routing import AUTO

__all__ = [
    "PredictInput",
    "RequestError",
    "decode_upload",
    "listed",
    "read_predict_request",
    "shortened",
]


class RequestError(Exception):
    """A request the server cannot answer as sent: HTTP `status`, `code` and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class PredictInput:
    """The encoded images of one request, the tasks asked for each, and how many classes."""

    images: list[bytes]
    tasks: list[str]
    top_k: int


_MISSING_IMAGE = (
    "no image in the request: send it as a multipart file field 'image' or as base64 in a JSON "
    'body {"image": "..."}'
)


#: How much of a client's text an error message repeats (a task "name" may be 200 kB long).
_ECHO_CHARS = 80

#: JSON bodies over this size are parsed and base64-decoded in a worker thread. Measured: a
#: 9.5 MB body (a 7 MB image) takes 52 ms, which on the event loop stalls every other client;
#: 1.4 MB, 7.6 ms; 136 kB, 0.6 ms (a thread hop costs about 0.1 ms).
JSON_IN_THREAD_BYTES = 256 * 1024


def shortened(value: object) -> str:
    """`value` as an error message quotes it: its repr, cut to `_ECHO_CHARS` characters."""
    quoted = repr(value)
    return quoted if len(quoted) <= _ECHO_CHARS else f"{quoted[:_ECHO_CHARS]}... (cut)"


def listed(values: Sequence[object], most: int = 5) -> str:
    """The first `most` values, each `shortened`, and how many more."""
    text = ", ".join(shortened(v) for v in values[:most])
    return text + (f" and {len(values) - most} more" if len(values) > most else "")


async def read_predict_request(
    request: Request, *, default_top_k: int = 5, limiter: CapacityLimiter | None = None
) -> PredictInput:
    """The images, tasks and top_k of a multipart/form-data or application/json request
    (`limiter`: bounds how many large JSON bodies are parsed at once, in worker threads)."""
    try:
        return await _read(request, default_top_k, limiter)
    except ClientDisconnect as error:  # nobody to answer; without this, a traceback in the log
        raise RequestError(400, "client_disconnected", "the client left mid-upload") from error


async def _read(
    request: Request, default_top_k: int, limiter: CapacityLimiter | None
) -> PredictInput:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        images, tasks, top_k = await _read_form(request)
    elif kind == "application/json":
        body = await request.body()
        if len(body) > JSON_IN_THREAD_BYTES:  # not on the event loop, which serves everyone
            images, tasks, top_k = await to_thread.run_sync(_read_json, body, limiter=limiter)
        else:
            images, tasks, top_k = _read_json(body)
    else:
        raise RequestError(
            415,
            "unsupported_media_type",
            f"content type {kind or 'none'!r} is not accepted: send multipart/form-data "
            "(file field 'image') or application/json (base64 'image')",
        )
    if not images:
        raise RequestError(400, "missing_image", _MISSING_IMAGE)
    for index, data in enumerate(images):
        if not data:
            raise RequestError(400, "empty_image", f"image {index} is empty (0 bytes)")
    return PredictInput(images, _task_names(tasks), _top_k(top_k, default_top_k))


async def _read_form(request: Request) -> tuple[list[bytes], list[str], Any]:
    try:
        form = await request.form()
    except (RequestError, ClientDisconnect):
        raise
    except Exception as error:  # python-multipart reports malformed bodies with several types
        raise RequestError(400, "bad_multipart", f"malformed multipart body: {error}") from error
    images = []
    for value in form.getlist("image"):
        if isinstance(value, UploadFile):
            images.append(await value.read())
        else:  # a text field: accepted as base64, like the JSON form
            images.append(_base64(value, len(images)))
    if not form:  # a body cut short, before any part's end: python-multipart says nothing
        raise RequestError(
            400,
            "missing_image",
            f"{_MISSING_IMAGE} (no complete part: was the body cut short, without its closing "
            "boundary?)",
        )
    for field in ("task", "top_k"):
        if any(isinstance(value, UploadFile) for value in form.getlist(field)):
            raise RequestError(400, f"bad_{field}", f"'{field}' must be a text field, not a file")
    tasks = [part for value in form.getlist("task") for part in str(value).split(",")]
    return images, tasks, form.get("top_k")


def _read_json(body: bytes) -> tuple[list[bytes], list[str], Any]:
    if not body:
        raise RequestError(400, "empty_body", f"the request body is empty; {_MISSING_IMAGE}")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError as error:  # [[[[...]]]] nested deeper than the parser's stack
        raise RequestError(400, "bad_json", "the JSON body is nested too deeply") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise RequestError(400, "bad_json", "the JSON body must be an object with an 'image'")
    encoded = data.get("images")
    if encoded is None:
        encoded = []
    if not isinstance(encoded, list):
        raise RequestError(400, "bad_json", "'images' must be a list of base64 strings")
    if data.get("image") is not None:
        encoded = [data["image"], *encoded]
    tasks = data.get("task")
    tasks = [] if tasks is None else tasks
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RequestError(400, "bad_task", "'task' must be a task name or a list of names")
    tasks = [part for name in tasks for part in name.split(",")]  # as the multipart field
    return [_base64(v, i) for i, v in enumerate(encoded)], tasks, data.get("top_k")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _base64(value: Any, index: int) -> bytes:
    """Standard or URL-safe base64, padded or not, line-wrapped or not (as `base64` tools
    print it), or a data: URL."""
    if not isinstance(value, str):
        raise RequestError(400, "bad_base64", f"image {index} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    text = "".join(value.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, "bad_base64", f"image {index} is not valid base64") from error


def _task_names(tasks: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    return names or [AUTO]


def _top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        top_k = int(value)
    except (TypeError, ValueError, OverflowError):
        top_k = 0
    if isinstance(value, bool) or top_k < 1 or str(top_k) != str(value).strip():
        raise RequestError(
            400, "bad_top_k", f"top_k must be a whole number >= 1, got {shortened(value)}"
        )
    return top_k


def decode_upload(data: bytes, index: int, *, max_pixels: int) -> Image.Image:
    """An uploaded image as 8-bit RGB (see `piggyback.images.decode_image`), or a RequestError:
    413 for too many pixels (checked on the header, before decoding), 400 for a non-image or
    truncated data."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as error:
        raise RequestError(413, "image_too_large", f"image {index}: {error}") from error
    except ImageError as error:
        raise RequestError(400, "invalid_image", f"image {index}: {error}") from error
