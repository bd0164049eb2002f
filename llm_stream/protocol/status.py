"""The one table from domain exceptions to gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from llm_stream.errors import (
    InvalidRequestError,
    LLMStreamError,
    ModelLoadError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)

# The trailing metadata gRPC clients' retry policies read as "wait this long, then retry".
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

STATUS_FOR_ERROR: dict[type[LLMStreamError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The code and client-facing message for ``exc``; unknown errors never leak a trace."""
    for kind in type(exc).__mro__:
        code = STATUS_FOR_ERROR.get(kind)
        if code is not None:
            return code, str(exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error while serving request {request_id}; the server log has the details",
    )


async def abort_with(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, pushback_ms: int
) -> NoReturn:
    """End the call with ``code``; a RESOURCE_EXHAUSTED tells the client when to retry."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(pushback_ms)),))
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover
