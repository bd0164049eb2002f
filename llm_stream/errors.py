"""The few domain exceptions, and the one table that says what each is on the wire.

Each message is written for the client: it says what was wrong and what to fix.
:data:`ERROR_KINDS` gives every exception its gRPC status code, its HTTP status
and OpenAI's error type and code, so both faces answer one failure alike
(``llm_stream.protocol.status`` and ``llm_stream.http.errors`` only read it).
"""

from __future__ import annotations

from dataclasses import dataclass

# The most characters of a client's own input that an error message quotes back.
QUOTE_LIMIT = 64


def quoted_input(value: str, limit: int = QUOTE_LIMIT) -> str:
    """A client-supplied string, quoted for an error message or a log line.

    At most ``limit`` characters of it, as a Python literal (so newlines, escapes,
    bidi controls and other non-printable characters appear escaped, never raw);
    when cut, the literal is followed by "... (N characters)". A 10 MB model_id thus
    comes back as a short message, not as 10 MB of status details.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class LLMStreamError(Exception):
    """Base of every error the server reports to a client on purpose."""


class InvalidRequestError(LLMStreamError):
    """The request itself is wrong (missing prompt, bad sampling value, too long).

    ``field`` names the offending field as the client spelled it (``top_p``,
    ``config.top_p``, ``messages[2].role``), when there is one: OpenAI's ``param``.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidSchemaError(InvalidRequestError):
    """A JSON schema the grammar engine cannot use. Raised where the schema is compiled,
    which knows not which field the client sent it in; the face names that field
    (:func:`llm_stream.front_door.request.blame_schema`)."""


class RequestTooLargeError(InvalidRequestError):
    """The request body is larger than the server takes."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """The request body is not declared as JSON."""


class ModelNotFoundError(LLMStreamError):
    """The request names a model_id the registry does not hold."""


class OverloadedError(LLMStreamError):
    """Every generation slot is busy and the wait queue is full."""


class UnauthenticatedError(LLMStreamError):
    """No API key, or one the server does not hold, on a server that needs one."""


class UnavailableError(LLMStreamError):
    """The server cannot take requests right now (warming up or draining)."""


class ModelLoadError(LLMStreamError):
    """A configured model could not be loaded; fatal at start-up."""


@dataclass(frozen=True)
class ErrorKind:
    """What one kind of failure is on each face."""

    grpc_code: str  # a grpc.StatusCode name
    http_status: int
    openai_type: str
    openai_code: str | None = None
    # The field every error of this kind is about, when the error names none itself.
    field: str | None = None

    @property
    def expected(self) -> bool:
        """A client's mistake or the server's state, not a bug (no trace in the log)."""
        return self is not INTERNAL


# Looked up along the exception's MRO, so a subclass's own entry wins.
ERROR_KINDS: dict[type[LLMStreamError], ErrorKind] = {
    RequestTooLargeError: ErrorKind(
        "INVALID_ARGUMENT", 413, "invalid_request_error", "request_too_large"
    ),
    UnsupportedMediaTypeError: ErrorKind(
        "INVALID_ARGUMENT", 415, "invalid_request_error", "unsupported_media_type"
    ),
    InvalidRequestError: ErrorKind("INVALID_ARGUMENT", 400, "invalid_request_error"),
    ModelNotFoundError: ErrorKind(
        "NOT_FOUND", 404, "invalid_request_error", "model_not_found", "model"
    ),
    UnauthenticatedError: ErrorKind(
        "UNAUTHENTICATED", 401, "invalid_request_error", "invalid_api_key"
    ),
    OverloadedError: ErrorKind(
        "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rate_limit_exceeded"
    ),
    UnavailableError: ErrorKind("UNAVAILABLE", 503, "server_error", "service_unavailable"),
    ModelLoadError: ErrorKind("UNAVAILABLE", 503, "server_error", "service_unavailable"),
}
# Anything else: a bug, reported with a request id and never with its trace.
INTERNAL = ErrorKind("INTERNAL", 500, "server_error", "internal_error")


def kind_of(exc: BaseException) -> ErrorKind:
    for cls in type(exc).__mro__:
        kind = ERROR_KINDS.get(cls)
        if kind is not None:
            return kind
    return INTERNAL


def client_message(exc: BaseException, request_id: str) -> str:
    """What the client is told: a domain error's own message, else only where to look."""
    if kind_of(exc) is INTERNAL:
        return f"internal error while serving request {request_id}; the server log has the details"
    return str(exc)
