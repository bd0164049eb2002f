"""API keys from a file, re-read when it changes, checked in constant time.

The file holds one key per line; blank lines and ``#`` comments are ignored. Keys
are never logged: logs and metrics name a key by its id, a short prefix of its
SHA-256, which identifies it to whoever holds the file and reveals nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BEARER = "bearer "
# How often, at most, the file's status is looked at for a change.
RELOAD_CHECK_INTERVAL_S = 1.0


def key_id(key: str) -> str:
    """A short, non-reversible name for a key, safe to log."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


# A comment starts a line, or follows whitespace: a "#" inside a key is part of it.
_COMMENT = re.compile(r"(?:^|\s)#.*")
# Shorter keys are accepted but logged: they can be guessed, and a key id (a short
# unsalted hash) would let anyone who reads the log check guesses offline.
MIN_KEY_LENGTH = 16


def parse_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        key = _COMMENT.sub("", line).strip()
        if key:
            keys.append(key)
    return keys


@dataclass(frozen=True)
class _Loaded:
    digests: tuple[tuple[bytes, str], ...]  # (sha256 of the key, its id)
    content: bytes  # sha256 of the file as read


class ApiKeyStore:
    """The keys in ``path``; :meth:`identify` names the key a request carries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._loaded = self._read()  # a missing or unreadable file at start is fatal
        if not self._loaded.digests:
            log.warning("API keys file %s holds no keys: every request is refused", path)
        else:
            log.info("API keys: %d loaded from %s", len(self._loaded.digests), path)

    def _read(self) -> _Loaded:
        """The file's keys; its whole contents are compared, not its mtime, since a
        rewrite within one timestamp tick would otherwise go unseen. (The file is
        read through the symlinks Kubernetes swaps when a Secret changes.)"""
        data = self.path.read_bytes()
        content = hashlib.sha256(data).digest()
        keys = parse_keys(data.decode("utf-8"))
        short = sorted({key_id(k) for k in keys if len(k) < MIN_KEY_LENGTH})
        if short:
            log.warning(
                "API keys shorter than %d characters can be guessed: %s",
                MIN_KEY_LENGTH,
                ", ".join(short),
            )
        digests = tuple(
            (hashlib.sha256(k.encode()).digest(), key_id(k)) for k in dict.fromkeys(keys)
        )
        return _Loaded(digests, content)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + RELOAD_CHECK_INTERVAL_S
            try:
                if hashlib.sha256(self.path.read_bytes()).digest() == self._loaded.content:
                    return
                loaded = self._read()
            except (OSError, UnicodeDecodeError) as exc:
                # Keep serving with the last keys read rather than lock everyone out
                # (or let everyone in) while the file is being replaced.
                log.error(
                    "cannot re-read API keys file %s (keeping the last keys): %s", self.path, exc
                )
                return
            before = {kid for _, kid in self._loaded.digests}
            after = {kid for _, kid in loaded.digests}
            self._loaded = loaded
            log.info(
                "API keys reloaded from %s: %d keys (added: %s; removed: %s)",
                self.path,
                len(after),
                ", ".join(sorted(after - before)) or "none",
                ", ".join(sorted(before - after)) or "none",
            )

    def identify(self, authorization: str | None) -> str | None:
        """The id of the key in an ``authorization: Bearer <key>`` value, or None."""
        self._refresh()
        if authorization is None or authorization[: len(BEARER)].lower() != BEARER:
            return None
        offered = hashlib.sha256(authorization[len(BEARER) :].strip().encode()).digest()
        found = None
        # Every key is compared, in constant time, whichever matches.
        for digest, kid in self._loaded.digests:
            if hmac.compare_digest(offered, digest):
                found = kid
        return found
