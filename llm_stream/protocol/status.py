"""gRPC status codes and messages for domain exceptions, read from the one table
(:data:`llm_stream.errors.ERROR_KINDS`)."""

from __future__ import annotations

import random
from typing import NoReturn

import grpc

from llm_stream.errors import client_message, kind_of

# The trailing metadata gRPC clients' retry policies read as "wait this long, then retry".
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# The longest status message sent. Messages are short by design and quote client input
# only through errors.quoted_input; this is the net under that: the message travels
# percent-encoded in the grpc-message trailer (up to 12 bytes a character), and gRPC
# clients drop a call whose metadata passes 8 to 16 KiB ("Stream removed").
MAX_MESSAGE_LENGTH = 512


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The code and client-facing message for ``exc``; unknown errors never leak a trace."""
    code = grpc.StatusCode[kind_of(exc).grpc_code]
    return code, bounded_message(client_message(exc, request_id))


def jittered(pushback_ms: int) -> int:
    """``pushback_ms`` ± half: gRPC clients wait the pushback exactly, so clients turned
    away together would otherwise all come back in the same instant."""
    return max(1, round(pushback_ms * random.uniform(0.5, 1.5)))


def bounded_message(message: str) -> str:
    """``message``, cut to MAX_MESSAGE_LENGTH characters (ending in "...") when longer."""
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    return message[: MAX_MESSAGE_LENGTH - 3] + "..."


async def abort_with(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, pushback_ms: int
) -> NoReturn:
    """End the call with ``code``; a RESOURCE_EXHAUSTED tells the client when to retry
    (``pushback_ms`` 0: no advice, the client's own backoff applies)."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and pushback_ms > 0:
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(jittered(pushback_ms))),))
    await context.abort(code, bounded_message(message))
    raise AssertionError("context.abort returned")  # pragma: no cover
