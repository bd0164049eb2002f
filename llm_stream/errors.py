"""The few domain exceptions; ``llm_stream.protocol.status`` maps each to a gRPC code.

Each message is written for the client: it says what was wrong and what to fix.
"""

from __future__ import annotations

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
    """The request itself is wrong (missing prompt, bad sampling value, too long)."""


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
