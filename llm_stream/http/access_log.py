"""One access-log line per HTTP request, once its response has ended.

uvicorn's own access log is off (its logging set-up would replace the server's);
this middleware logs through the server's logging instead, so the line carries
the request's id in brackets like every other line of that request: the
``x-request-id`` the response sends. A streamed response is logged when its
stream ends, with the whole stream's bytes and time.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_stream.logging_setup import request_id_var

log = logging.getLogger("llm_stream.http.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.monotonic()
        status, size, request_id = 0, 0, "-"

        async def sending(message: Message) -> None:
            nonlocal status, size, request_id
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-request-id":
                        request_id = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self._app(scope, receive, sending)
        finally:
            client = scope.get("client")
            context = request_id_var.set(request_id)
            try:
                log.info(
                    '%s "%s %s HTTP/%s" %s %d bytes in %.1f ms',
                    f"{client[0]}:{client[1]}" if client else "-",
                    scope.get("method", "-"),
                    scope.get("path", "-"),
                    scope.get("http_version", "1.1"),
                    status or "-",
                    size,
                    (time.monotonic() - started) * 1000,
                )
            finally:
                request_id_var.reset(context)
