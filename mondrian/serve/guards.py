"""ASGI middleware that keeps a hostile or unlucky client from costing more than one request.

`BodyGuard`: a request body is at most `max_bytes` and must arrive whole within `timeout_s`.
A Content-Length over the limit is refused before reading (413); a body without one (chunked)
is counted as it streams and cut at the limit, so it is never buffered whole; a body that has
not arrived by the deadline (a client sending 1 byte/s) is refused with 408.

`CatchAll`: an exception no handler expected becomes a JSON 500 and a log line with the
traceback, and the connection stays usable (Starlette's own last-resort handler re-raises, and
uvicorn then drops the keep-alive connection after a plain-text 500).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from mondrian.serve.errors import ServiceError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("mondrian.serve")


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """OpenAI's error object, so the openai client raises a typed error carrying our message."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class BodyGuard:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_bytes):
            response = error_response(413, f"the body is {size.decode(errors='replace')} bytes; "
                                           f"the limit is {self.max_bytes}")
            await response(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        state = {"bytes": 0, "done": False}

        async def guarded() -> Message:
            if state["done"]:  # after the body: waiting for a disconnect is not bounded
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ServiceError(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_bytes:
                    raise ServiceError(413, f"the body is over {self.max_bytes} bytes (the limit)")
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        await self.app(scope, guarded, send)


class CatchAll:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except ServiceError as exc:  # raised outside a route (the body guard's 408 / 413)
            if started:
                raise
            await error_response(exc.status, exc.message)(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the last resort: a JSON 500, never a dropped connection
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # half a response went out: only closing the connection is honest
            await error_response(500, f"internal error ({type(exc).__name__}); the server log has the "
                                      "traceback", "server_error")(scope, receive, send)
