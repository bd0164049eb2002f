"""Who may call, and how much one caller may hold: shared by every transport.

:class:`AccessControl` raises domain errors (UNAUTHENTICATED, RESOURCE_EXHAUSTED,
INVALID_ARGUMENT through the one status table), so gRPC and HTTP refuse the same
requests with the same messages and count one key's generations together.
"""

from __future__ import annotations

from collections import Counter

from llm_stream.access.api_keys import ApiKeyStore
from llm_stream.errors import InvalidRequestError, OverloadedError, UnauthenticatedError

HOW_TO_AUTHENTICATE = (
    "send the header 'authorization: Bearer <key>' with a key from the server's "
    "--api-keys-file (python -m llm_stream.client --api-key KEY, or LLM_STREAM_API_KEY)"
)


class AccessControl:
    """API keys (optional) and the per-key cap on generations held."""

    def __init__(self, keys: ApiKeyStore | None = None, max_per_key: int = 0) -> None:
        self._keys = keys
        self._max_per_key = max_per_key
        self._held: Counter[str] = Counter()

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    def held_by(self, key: str) -> int:
        return self._held[key]

    def authenticate(self, authorization: str | None) -> str:
        """The caller's key id ("" when the server has no keys); raises if refused."""
        if self._keys is None:
            return ""
        if authorization is None:
            raise UnauthenticatedError(f"this server needs an API key: {HOW_TO_AUTHENTICATE}")
        found = self._keys.identify(authorization)
        if found is None:
            raise UnauthenticatedError(
                f"the API key sent is not valid (unknown or revoked): {HOW_TO_AUTHENTICATE}"
            )
        return found

    def acquire(self, key: str, units: int) -> None:
        """Count ``units`` generations against ``key``; raises past its cap."""
        if not key or not units:
            return
        if self._max_per_key:
            if units > self._max_per_key:
                raise InvalidRequestError(
                    f"this request holds {units} generations but an API key may hold at "
                    f"most {self._max_per_key} at once: split it"
                )
            if self._held[key] + units > self._max_per_key:
                raise OverloadedError(
                    f"API key {key} already holds {self._held[key]} of its "
                    f"{self._max_per_key} concurrent generations; retry when one finishes"
                )
        self._held[key] += units

    def release(self, key: str, units: int) -> None:
        if key and units:
            self._held[key] -= units
            if self._held[key] <= 0:
                del self._held[key]
