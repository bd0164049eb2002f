"""The one table from domain exceptions to HTTP statuses and OpenAI's error shape.

Every error the HTTP API returns has OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, so OpenAI SDKs raise their
usual exception classes (``BadRequestError``, ``NotFoundError``,
``RateLimitError``...) with the server's message. Each error also carries the
gRPC code the same failure has on the gRPC port, for the shared
``llm_stream_rejected_requests`` metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from llm_stream.errors import (
    InvalidRequestError,
    LLMStreamError,
    ModelLoadError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from llm_stream.protocol.status import status_for


class ParamError(InvalidRequestError):
    """An invalid request that names the offending OpenAI parameter (``error.param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLargeError(InvalidRequestError):
    """The request body is larger than the HTTP API takes."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is not declared ``Content-Type: application/json``."""


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None
    # The OpenAI parameter every error of this kind is about, if any.
    param: str | None = None


# Looked up along the exception's MRO, so a subclass's own entry wins.
HTTP_ERRORS: dict[type[Exception], HttpError] = {
    BodyTooLargeError: HttpError(413, "invalid_request_error", "request_too_large"),
    UnsupportedMediaTypeError: HttpError(415, "invalid_request_error", "unsupported_media_type"),
    InvalidRequestError: HttpError(400, "invalid_request_error", None),
    ModelNotFoundError: HttpError(404, "invalid_request_error", "model_not_found", "model"),
    UnauthenticatedError: HttpError(401, "invalid_request_error", "invalid_api_key"),
    OverloadedError: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    UnavailableError: HttpError(503, "server_error", "service_unavailable"),
    ModelLoadError: HttpError(503, "server_error", "service_unavailable"),
}
INTERNAL = HttpError(500, "server_error", "internal_error")


@dataclass(frozen=True)
class ErrorReply:
    """What the client is told about one failure."""

    kind: HttpError
    message: str
    param: str | None
    # The gRPC code name of the same failure, for the rejected-requests metric.
    grpc_code: str

    @property
    def expected(self) -> bool:
        """A client's mistake or the server's state, not a bug (no trace in the log)."""
        return self.kind is not INTERNAL

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind.type, self.kind.code, self.param)


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def reply_for(exc: BaseException, request_id: str) -> ErrorReply:
    """The status, body and metric code for ``exc``; unknown errors never leak a trace."""
    grpc_code, message = status_for(exc, request_id)
    if isinstance(exc, LLMStreamError):
        for kind in type(exc).__mro__:
            found = HTTP_ERRORS.get(kind)
            if found is not None:
                param = exc.param if isinstance(exc, ParamError) else found.param
                return ErrorReply(found, message, param, grpc_code.name)
    return ErrorReply(INTERNAL, message, None, grpc_code.name)


def error_response(
    reply: ErrorReply, retry_after_s: float, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error response; 429 and 503 say when to retry, 401 how to authenticate."""
    extra = dict(headers or {})
    if reply.kind.status in {429, 503}:
        # Retry-After takes whole seconds; never 0, which would invite a hot loop.
        extra["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if reply.kind.status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse(reply.body(), status_code=reply.kind.status, headers=extra)
