"""uvicorn inside the server's own event loop (no second process, no thread).

The listening socket is bound up front by :meth:`HttpServer.bind`, so that a port
in use is an OSError at start-up like the gRPC port's (uvicorn itself would log
and ``sys.exit``). uvicorn's signal handlers are left out: the application owns
SIGTERM and SIGINT (``llm_stream.serve`` drains on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import anyio
import anyio.lowlevel
import anyio.to_thread
import uvicorn
from starlette.types import ASGIApp

from llm_stream.http.access_log import AccessLog

log = logging.getLogger(__name__)

# Errors that mean "no IPv6 here", on which binding all interfaces falls back to IPv4.
_NO_IPV6 = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}


class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handling: the application shuts it down."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """A listening socket on ``host`` (``[::]`` style allowed) and ``port``.

    ``[::]``, ``::`` or an empty host is every interface, IPv6 and IPv4 where the
    machine has both. Raises OSError when the address cannot be bound.
    """
    name = host.strip("[]")
    if name in {"", "::"}:
        try:
            return [
                socket.create_server(
                    ("::", port),
                    family=socket.AF_INET6,
                    dualstack_ipv6=socket.has_dualstack_ipv6(),
                )
            ]
        except OSError as exc:
            if exc.errno not in _NO_IPV6:
                raise
            return [socket.create_server(("0.0.0.0", port))]
    family, _, _, _, address = socket.getaddrinfo(
        name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return [socket.create_server(address, family=family)]


async def _load_anyio() -> None:
    """Import now what anyio (under starlette) would import inside the first requests.

    anyio loads its parts on first use; an import holds the event loop, and every
    stream on it, for its whole duration, so it happens here, at start-up.
    """
    await anyio.to_thread.run_sync(lambda: None)  # the asyncio backend and thread pool
    anyio.lowlevel.checkpoint  # noqa: B018 - each attribute access imports its module
    anyio.open_file  # noqa: B018 - file responses (the chat page)


class HttpServer:
    """An ASGI app served by uvicorn (HTTP/1.1 with h11) as a task of the running loop."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """With ``ssl_context``, HTTPS: uvicorn serves new connections with whatever
        certificate that context holds at the time (see ``http.tls``)."""
        self._host = host
        self._requested_port = port
        self._config = uvicorn.Config(
            AccessLog(app),
            host=host.strip("[]"),
            port=port,
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,  # the server's own logging set-up stays
            access_log=False,  # logged by AccessLog, in the server's own format
            server_header=False,
            ssl_context_factory=(
                None if ssl_context is None else lambda _config, _default: ssl_context
            ),
        )
        self._server = _InLoopServer(self._config)
        self._sockets: list[socket.socket] = []
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    def bind(self) -> int:
        """Listen now (OSError if the port cannot be had); returns the bound port."""
        self._sockets = bind_sockets(self._host, self._requested_port)
        self.port = int(self._sockets[0].getsockname()[1])
        return self.port

    async def start(self) -> None:
        """Serve on the bound socket; returns once uvicorn accepts connections."""
        assert self._sockets, "bind() first"
        await _load_anyio()
        self._task = asyncio.create_task(
            self._server.serve(sockets=self._sockets), name="http-server"
        )
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.005)

    async def stop(self, timeout_s: float) -> None:
        """Stop listening, close idle connections, give requests still running
        ``timeout_s`` (at least a second) to finish, then cancel them."""
        if self._task is None:
            for sock in self._sockets:
                sock.close()
            return
        # Whole seconds, and at least one: uvicorn reports a timeout of 0 as exceeded
        # (an ERROR line) even when no request is left to wait for.
        self._config.timeout_graceful_shutdown = max(1, math.floor(timeout_s))
        self._server.should_exit = True
        await self._task
