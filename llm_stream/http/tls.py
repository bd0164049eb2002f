"""HTTPS for the HTTP port with the same certificate files as the gRPC port.

Python's ``ssl`` has no per-handshake hook to ask for a new certificate, so a
task looks at the files every few seconds and loads a changed, usable set into
the one ``SSLContext`` that uvicorn serves with: new connections then get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

from llm_stream.tls_files import CertificateWatcher, TLSFiles, load_into

log = logging.getLogger(__name__)

RELOAD_CHECK_INTERVAL_S = 2.0


class ReloadingSSLContext:
    """A server SSLContext (mTLS when the files have a client CA) kept up to date."""

    def __init__(self, files: TLSFiles) -> None:
        self._watcher = CertificateWatcher(files, "HTTP port")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        if files.client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
        load_into(self.context, self._watcher.current)
        self._task: asyncio.Task[None] | None = None

    def reload_if_changed(self) -> bool:
        fresh = self._watcher.changed()
        if fresh is None:
            return False
        load_into(self.context, fresh)
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
