"""HTTPS for the HTTP port with the same certificate files as the gRPC port.

uvicorn serves with one ``SSLContext`` whose ``sni_callback`` (which OpenSSL runs
on every handshake, with or without SNI) hands each new connection the current
context. A task looks at the files every few seconds and, when they changed to a
usable set, builds a fresh context on a worker thread and swaps it in with one
assignment: a live context is never modified, and a rotated client CA replaces
the old one instead of being added beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from llm_stream.tls_files import CertificateSet, CertificateWatcher, TLSFiles, load_into

log = logging.getLogger(__name__)

RELOAD_CHECK_INTERVAL_S = 2.0


def server_context(
    certificates: CertificateSet, require_client_certificate: bool
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    load_into(context, certificates)
    return context


class ReloadingSSLContext:
    """``context`` is what uvicorn serves with; each handshake gets the current set."""

    def __init__(self, files: TLSFiles) -> None:
        self._watcher = CertificateWatcher(files, "HTTP port")
        self._mtls = files.client_ca is not None
        self.context = server_context(self._watcher.current, self._mtls)
        self.context.sni_callback = self._hand_over
        # Until the first rotation the served context is the current one.
        self._current = self.context
        self._task: asyncio.Task[None] | None = None

    def _hand_over(
        self, connection: ssl.SSLObject, _server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        connection.context = self._current

    def reload_if_changed(self) -> bool:
        fresh = self._watcher.changed()
        if fresh is None:
            return False
        self._current = server_context(fresh, self._mtls)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="https-certificate-reload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_INTERVAL_S)
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except (OSError, ssl.SSLError) as exc:  # the watcher checked them; be safe anyway
                log.error("cannot load the new TLS files into the HTTP port: %s", exc)
