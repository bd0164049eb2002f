"""Who is calling, what they hold, and how a refusal is logged and counted: one path
for both faces."""

from __future__ import annotations

import logging
from collections.abc import Callable

from llm_stream.access import AccessControl
from llm_stream.errors import ErrorKind, client_message, kind_of
from llm_stream.logging_setup import key_id_var

log = logging.getLogger(__name__)


class Admission:
    """API keys, the per-key cap, and the rejected-requests metric, for every face."""

    def __init__(
        self, access: AccessControl, on_rejected: Callable[[str], None] = lambda _code: None
    ) -> None:
        self.access = access
        self._on_rejected = on_rejected

    def authenticate(self, authorization: str | None) -> str:
        """The caller's key id ("" without keys), also set for the log; raises if refused."""
        key = self.access.authenticate(authorization)
        key_id_var.set(key)
        return key

    def hold(self, key: str, units: int) -> None:
        """Count ``units`` generations against ``key``; raises past its cap."""
        self.access.acquire(key, units)

    def release(self, key: str, units: int) -> None:
        self.access.release(key, units)

    def rejected(self, exc: BaseException, request_id: str, peer: str = "") -> ErrorKind:
        """Counts and logs a request that failed: a client's mistake or the server's
        state in one line, anything else with its trace under the request id."""
        kind = kind_of(exc)
        self._on_rejected(kind.grpc_code)
        if kind.expected:
            source = f" from {peer}" if peer else ""
            log.info("request%s rejected: %s %s", source, kind.grpc_code, client_message(exc, ""))
        else:
            log.error("request %s failed", request_id, exc_info=exc)
        return kind
