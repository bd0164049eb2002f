"""Domain exceptions in OpenAI's error shape, read from the one table
(:data:`llm_stream.errors.ERROR_KINDS`).

Every error the HTTP API returns has OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, so OpenAI SDKs raise their
usual exception classes (``BadRequestError``, ``NotFoundError``,
``RateLimitError``...) with the server's message. An invalid request's ``field``
becomes ``param``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from llm_stream.errors import ErrorKind, InvalidRequestError, kind_of
from llm_stream.protocol.status import status_for


@dataclass(frozen=True)
class ErrorReply:
    """What the client is told about one failure."""

    kind: ErrorKind
    message: str
    param: str | None

    @property
    def expected(self) -> bool:
        return self.kind.expected

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind.openai_type, self.kind.openai_code, self.param)


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def reply_for(exc: BaseException, request_id: str) -> ErrorReply:
    """The status, body and message for ``exc``; unknown errors never leak a trace."""
    kind = kind_of(exc)
    _code, message = status_for(exc, request_id)  # the same bounded message as gRPC's
    field = exc.field if isinstance(exc, InvalidRequestError) else None
    return ErrorReply(kind, message, field or kind.field)


def error_response(
    reply: ErrorReply, retry_after_s: float, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error response; 429 and 503 say when to retry, 401 how to authenticate."""
    status = reply.kind.http_status
    extra = dict(headers or {})
    if status in {429, 503}:
        # Retry-After takes whole seconds; never 0, which would invite a hot loop.
        extra["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse(reply.body(), status_code=status, headers=extra)
