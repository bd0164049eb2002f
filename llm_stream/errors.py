"""The few domain exceptions; ``llm_stream.protocol.status`` maps each to a gRPC code.

Each message is written for the client: it says what was wrong and what to fix.
"""

from __future__ import annotations


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
