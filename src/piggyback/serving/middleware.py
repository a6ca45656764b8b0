"""ASGI middleware around the API: bearer-token check, upload size limit, response counting.

Written as plain ASGI callables rather than Starlette's BaseHTTPMiddleware (which copies every
request into a task of its own) because they sit on every request of a batching server. The body
limit is our own because Starlette's answers in plain text, and every error here is JSON.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Collection

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from piggyback.serving.inputs import RequestError

__all__ = ["BearerAuth", "BodyLimit", "CountResponses", "error_response"]


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    """The one JSON shape of every error: {"error": {"code": ..., "message": ...}}."""
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers or None)


class BearerAuth:
    """401 unless `Authorization: Bearer <api_key>`, on every path but `public` ones.

    The 401 says only that the token is missing or wrong: not which routes exist, not whether
    the path is valid (checked before routing), not how close the token was (constant-time).
    """

    def __init__(self, app: ASGIApp, *, api_key: str, public: Collection[str]) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            # The scheme's case does not matter (RFC 9110); the token is compared in constant
            # time, and encoded as received (latin-1: what HTTP headers carry).
            given = token.strip().encode("latin-1", errors="replace")
            if not (secrets.compare_digest(given, self.expected) and scheme.lower() == "bearer"):
                response = error_response(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token",
                    **{"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for request bodies over `max_bytes`: at once when Content-Length says so, or as soon
    as a streamed (chunked) body passes the limit, before the rest is read. 408 when the next
    piece of a body takes over `timeout_s` to come: uvicorn has no such timeout, and a client
    that stops mid-upload would otherwise hold its request (and a server's shutdown) forever."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> RequestError:
        megabytes = self.max_bytes / 2**20
        return RequestError(
            413,
            "upload_too_large",
            f"the request body is larger than the upload limit of {megabytes:g} MB "
            "(--max-upload-mb): send a smaller file",
        )

    def _too_slow(self) -> RequestError:
        return RequestError(
            408,
            "upload_timeout",
            f"no part of the request body came for {self.timeout_s:g} s: send it again",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = self._too_large()
            await error_response(error.status, error.code, error.message)(scope, receive, send)
            return
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                raise self._too_slow() from None  # inside the route: its handler answers
            complete = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()  # raised inside the route: its handler answers JSON
            return message

        await self.app(scope, limited_receive, send)


class CountResponses:
    """Calls `record(status)` for every HTTP response (metrics)."""

    def __init__(self, app: ASGIApp, *, record: Callable[[int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.record(int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)
