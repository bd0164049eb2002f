"""The starlette application: OpenAI's chat completions, completions and models.

Each generation takes the gRPC side's path through the front door: the same
API-key check, per-key cap, rejection log and metric
(:class:`~llm_stream.front_door.admission.Admission`), the same request checks
(:func:`~llm_stream.front_door.request.validate`), the same tool-call reading, the
same engine (so the same admission, queue and batch). What is HTTP's own:

- the request id comes from an ``x-request-id`` header (cleaned like the gRPC
  ``request_id``) or is generated; it is echoed as ``x-request-id`` and embedded
  in the response's ``id`` (``chatcmpl-<id>``, ``cmpl-<id>``);
- a body must be declared ``application/json`` (415 otherwise, so that no web
  page can start generations cross-site with a plain form-like POST) and is
  held to its own limit, :data:`HTTP_MAX_BODY_BYTES` (413 beyond it);
- a streamed answer's status and headers are sent with its first token, so a
  request turned away (400, 404, 429, 503) gets a real HTTP status, not an error
  inside a 200 stream;
- the client's connection is watched while the model works: when it closes,
  streaming or not, the generation is cancelled, and the engine frees its row
  before the next decode step, as for a gRPC cancel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from llm_stream.engine.engine import Engine
from llm_stream.engine.types import GenerationRequest, StreamEnd, TokenEvent
from llm_stream.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
    quoted_input,
)
from llm_stream.front_door.admission import Admission
from llm_stream.front_door.request import RequestLimits, ValidRequest, blame_schema, validate
from llm_stream.front_door.tools import tool_reading
from llm_stream.http.errors import ErrorReply, error_body, error_response, reply_for
from llm_stream.http.openai_schema import (
    SSE_DONE,
    Chunks,
    OpenAIRequest,
    ResponseInfo,
    chat_completion,
    chat_request,
    completion_request,
    model_card,
    sse_event,
    text_completion,
)
from llm_stream.logging_setup import request_id_var
from llm_stream.protocol.convert import request_id_from, request_id_header
from llm_stream.protocol.health import HealthState

log = logging.getLogger(__name__)

T = TypeVar("T")

STATIC_DIR = Path(__file__).parent / "static"
# The largest request body the HTTP API takes (less if --max-message-mb is lower).
# Decoding and converting a body holds the GIL for long stretches wherever it runs
# (json.loads is one C call, about 10 ms per MiB; the objects it makes bring on
# full garbage collections), stalling the event loop and every stream on it.
# 2 MiB holds far more text than any model context (about 500k tokens), and keeps the
# worst body (hundreds of thousands of tiny messages) to tens of milliseconds.
HTTP_MAX_BODY_BYTES = 2 * 1024 * 1024
# Bodies larger than this are decoded and converted on a worker thread. That lets
# the loop run in between, but does not make the work free for it: the limit above
# is what bounds the stall.
CONVERT_ON_THREAD_BYTES = 64 * 1024
# Headers of the chat page and its files. The policy allows no inline script or
# style anywhere, so model output can never run as code; frame-ancestors (which
# a <meta> policy cannot set) and X-Frame-Options keep the page out of frames.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
ROUTES_HELP = "this server serves POST /v1/chat/completions, POST /v1/completions, GET /v1/models"

Parser = Callable[[object, str], OpenAIRequest]
Event = TokenEvent | StreamEnd


class _PageFiles(StaticFiles):
    """The chat page's files, with :data:`PAGE_HEADERS`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body must have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, unless the client leaves first: then ``work`` is cancelled
    (and has finished cancelling) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # retrieved: a failing receive counts as a disconnect
    if task.cancelled():
        raise ClientGone
    return task.result()


class _NoResponse(Response):
    """For a client that has already gone: there is nobody to answer."""

    def __init__(self) -> None:
        super().__init__(status_code=204)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


class EventStream(StreamingResponse):
    """Server-sent events that stop, and clean up, when the client leaves.

    ``close`` runs however the response ends (finished, client gone, server
    shutting down), even if streaming never started: it ends the generation and
    gives back what the request held.
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        close: Callable[[], Coroutine[Any, Any, None]],
        headers: dict[str, str],
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnected(receive, self.stream_response(send))
        except ClientGone:
            log.info("client closed the stream; generation cancelled")
        finally:
            await self._events.aclose()
            await self._close()


class OpenAIApi:
    """The HTTP face of one server: build it once, serve ``.app``."""

    def __init__(
        self,
        engine: Engine,
        health: HealthState,
        admission: Admission,
        limits: RequestLimits,
        *,
        retry_after_s: float = 0.5,
        max_body_bytes: int = HTTP_MAX_BODY_BYTES,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self._engine = engine
        self._health = health
        self._admission = admission
        self._limits = limits
        self._retry_after_s = retry_after_s
        self._max_body_bytes = max_body_bytes
        self._static_dir = static_dir
        self._created = int(time.time())
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.app = Starlette(
            routes=self._routes(), exception_handlers={HTTPException: self._http_exception}
        )

    def _routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/", self.index, methods=["GET"]),
        ]
        if self._static_dir.is_dir():
            routes.append(Mount("/static", _PageFiles(directory=self._static_dir)))
        return routes

    # -- drain ---------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Generations this API is serving now (streams included)."""
        return self._active

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every generation to end; whether they all did."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _hold(self, key: str) -> None:
        self._admission.hold(key, 1)
        self._active += 1
        self._idle.clear()

    def _release(self, key: str) -> None:
        self._admission.release(key, 1)
        self._active -= 1
        if not self._active:
            self._idle.set()

    # -- plumbing ----------------------------------------------------------------------

    @staticmethod
    def _request_id(request: Request) -> str:
        request_id = request_id_from(request.headers.get("x-request-id", ""))
        request_id_var.set(request_id)
        return request_id

    @staticmethod
    def _headers(request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id_header(request_id)}

    def _authenticate(self, request: Request) -> str:
        return self._admission.authenticate(request.headers.get("authorization"))

    def _reply(self, exc: BaseException, request_id: str) -> ErrorReply:
        """Logs and counts a failure; what the client is told about it."""
        self._admission.rejected(exc, request_id)
        return reply_for(exc, request_id)

    def _error(self, exc: BaseException, request_id: str) -> Response:
        reply = self._reply(exc, request_id)
        return error_response(reply, self._retry_after_s, self._headers(request_id))

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused unless it is declared JSON (415) and fits the
        limit (413). The media type matters: a web page can POST text/plain to any
        origin without a CORS preflight, but not application/json."""
        media_type = request.headers.get("content-type", "").partition(";")[0].strip()
        if media_type.lower() != "application/json":
            sent = quoted_input(media_type) if media_type else "no Content-Type"
            raise UnsupportedMediaTypeError(
                "the request body must be JSON sent with the header "
                f"`Content-Type: application/json`; got {sent}"
            )
        limit = self._max_body_bytes
        too_large = RequestTooLargeError(
            f"the request body is larger than this server's HTTP limit of {limit} bytes"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _convert(
        self, request: Request, parse: Parser, request_id: str
    ) -> tuple[OpenAIRequest, ValidRequest]:
        """The body decoded, converted and checked: for a body above
        CONVERT_ON_THREAD_BYTES, all of it in one worker-thread call."""
        data = await self._read_body(request)
        if len(data) > CONVERT_ON_THREAD_BYTES:
            return await asyncio.to_thread(self._convert_body, data, parse, request_id)
        return self._convert_body(data, parse, request_id)

    def _convert_body(
        self, data: bytes, parse: Parser, request_id: str
    ) -> tuple[OpenAIRequest, ValidRequest]:
        try:
            body = json.loads(data)
        except RecursionError:
            raise InvalidRequestError("the request body's JSON is nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
        parsed = parse(body, request_id)
        return parsed, validate(parsed.draft, self._limits)

    # -- generations -----------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat_request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, completion_request, chat=False)

    async def _generate(self, request: Request, parse: Parser, *, chat: bool) -> Response:
        request_id = self._request_id(request)
        key = ""
        held = False
        valid: ValidRequest | None = None
        try:
            key = self._authenticate(request)
            parsed, valid = await self._convert(request, parse, request_id)
            generation = dataclasses.replace(valid.generation, client=key)
            headers = self._headers(request_id)
            self._engine.check_accepting()
            backend = self._engine.backend_for(generation.model_id)
            # Tools left out are said where a client can see it (a header), and logged.
            reading = tool_reading(valid, backend.model_id, backend.tool_format)
            if reading.header:
                headers.update((reading.header,))
            self._hold(key)
            held = True
            info = ResponseInfo(
                id=f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
                created=int(time.time()),
                model=backend.model_id,
                fingerprint=backend.version,
            )
            if parsed.stream:
                chunks = Chunks(info, chat, parsed.include_usage, reading)
                response = await self._open_stream(request, generation, chunks, key, headers)
                held = False  # the stream gives it back when it ends
                return response
            completion = await until_disconnected(
                request.receive, self._engine.complete(generation)
            )
            body = (
                chat_completion(info, completion, reading)
                if chat
                else text_completion(info, completion)
            )
            return JSONResponse(body, headers=headers)
        except (ClientGone, ClientDisconnect):
            log.info("client left before its answer (its generation, if any, is cancelled)")
            return _NoResponse()
        except Exception as exc:
            return self._error(blame_schema(exc, valid), request_id)
        finally:
            if held:
                self._release(key)

    async def _open_stream(
        self,
        request: Request,
        generation: GenerationRequest,
        chunks: Chunks,
        key: str,
        headers: dict[str, str],
    ) -> Response:
        """Waits for the first token (so that a refusal is a real HTTP status), then streams."""
        events = self._engine.stream(generation)

        async def first_event() -> Event:
            return await anext(events)

        try:
            first = await until_disconnected(request.receive, first_event())
        except BaseException:
            await events.aclose()
            raise
        body = self._sse(first, events, chunks, generation.request_id)

        async def close() -> None:
            await events.aclose()
            self._release(key)

        headers = {
            **headers,
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # nginx and friends: do not buffer the stream
        }
        return EventStream(body, close, headers)

    async def _sse(
        self, first: Event, events: AsyncIterator[Event], chunks: Chunks, request_id: str
    ) -> AsyncGenerator[bytes, None]:
        for chunk in chunks.opening():
            yield sse_event(chunk)
        event = first
        try:
            while not isinstance(event, StreamEnd):
                if event.text:
                    for chunk in chunks.text(event.text):
                        yield sse_event(chunk)
                event = await anext(events)
        except Exception as exc:
            # The status has gone out: the failure travels as an error event instead.
            yield sse_event(self._reply(exc, request_id).body())
            return
        for chunk in chunks.closing(event):
            yield sse_event(chunk)
        yield SSE_DONE

    # -- models, health, the page ------------------------------------------------------

    async def models(self, request: Request) -> Response:
        request_id = self._request_id(request)
        try:
            self._authenticate(request)
            self._engine.check_accepting()
        except Exception as exc:
            return self._error(exc, request_id)
        default = self._engine.default_model_id
        ids = sorted(self._engine.backends, key=lambda model_id: model_id != default)
        backends = self._engine.backends
        cap = self._limits.max_tokens_cap
        cards = [model_card(i, self._created, backends[i].sampling_defaults, cap) for i in ids]
        body = {"object": "list", "data": cards}
        return JSONResponse(body, headers=self._headers(request_id))

    async def model(self, request: Request) -> Response:
        request_id = self._request_id(request)
        try:
            self._authenticate(request)
            self._engine.check_accepting()
            model_id = request.path_params["model_id"]
            if not model_id:  # backend_for("") would be the default model
                raise ModelNotFoundError("name a model: GET /v1/models/{model}")
            backend = self._engine.backend_for(model_id)
        except Exception as exc:
            return self._error(exc, request_id)
        return JSONResponse(
            model_card(
                backend.model_id,
                self._created,
                backend.sampling_defaults,
                self._limits.max_tokens_cap,
            ),
            headers=self._headers(request_id),
        )

    async def health(self, request: Request) -> Response:
        """For HTTP probes: 200 once warmed up, 503 before and while draining."""
        serving = self._health.serving
        return JSONResponse(
            {"status": "SERVING" if serving else "NOT_SERVING"},
            status_code=200 if serving else 503,
        )

    async def index(self, request: Request) -> Response:
        page = self._static_dir / "index.html"
        if not page.is_file():
            return JSONResponse(
                error_body(f"no chat page is installed; {ROUTES_HELP}", "invalid_request_error"),
                status_code=404,
            )
        return FileResponse(page, headers=PAGE_HEADERS)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        """Unknown paths and wrong methods, in OpenAI's error shape too."""
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {quoted_input(request.url.path)}"
        if exc.status_code == 404:
            message = f"no such endpoint: {where}; {ROUTES_HELP}"
        elif exc.status_code == 405:
            message = f"method not allowed: {where}; {ROUTES_HELP}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            error_body(message, "invalid_request_error", _http_code(exc.status_code)),
            status_code=exc.status_code,
            headers=exc.headers,
        )


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, "invalid_request")
