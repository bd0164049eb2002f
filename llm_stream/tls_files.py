"""The TLS certificate, key and client CA files, watched for changes.

cert-manager rotates a Secret under a running pod and the kubelet swaps the
mounted files. :class:`CertificateWatcher` reads and checks them at start (bad
files are fatal then), and later says when they changed to another usable set;
a half-written or mismatched pair is logged and ignored, and the last good set
stays in use. The gRPC port (``protocol.tls``) and the HTTP port (``http.tls``)
each serve what it reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """The certificate, key or client CA cannot be used; the message says which."""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())


@dataclass(frozen=True)
class CertificateSet:
    """The files' contents as read together, and what the files looked like then."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    stamp: tuple[tuple[int, int, int], ...]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert).hexdigest()[:12]

    def same_contents(self, other: CertificateSet) -> bool:
        return (self.cert, self.key, self.client_ca) == (other.cert, other.key, other.client_ca)


def _stamp(files: TLSFiles) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in files.paths():
        status = os.stat(path)  # follows the symlinks a Secret volume swaps
        stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
    return tuple(stamps)


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> str:
    # Called by OpenSSL only for an encrypted key; without it OpenSSL would prompt
    # on the terminal, blocking start-up (or a handshake thread on reload).
    raise _EncryptedKey


def load_into(context: ssl.SSLContext, certificates: CertificateSet) -> None:
    """Load exactly these bytes (not whatever the paths hold by now) into ``context``.

    ``load_cert_chain`` reads files, so the bytes go through a private temporary
    folder. Raises ssl.SSLError or _EncryptedKey when they are not usable."""
    with tempfile.TemporaryDirectory(prefix="llm-stream-tls-") as folder:
        cert, key = Path(folder) / "tls.crt", Path(folder) / "tls.key"
        key.touch(mode=0o600)
        key.write_bytes(certificates.key)
        cert.write_bytes(certificates.cert)
        context.load_cert_chain(cert, key, password=_refuse_password)
    if certificates.client_ca is not None:
        context.load_verify_locations(cadata=certificates.client_ca.decode("ascii", "replace"))


def read_certificates(files: TLSFiles) -> CertificateSet:
    """Read the files once and check those bytes; raises TLSConfigError saying what is wrong."""
    try:
        stamp = _stamp(files)
        cert, key = files.cert.read_bytes(), files.key.read_bytes()
        client_ca = files.client_ca.read_bytes() if files.client_ca else None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    certificates = CertificateSet(cert, key, None, stamp)
    try:
        # The stdlib's OpenSSL checks that the key belongs to the certificate.
        load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), certificates)
    except _EncryptedKey:
        raise TLSConfigError(
            f"--tls-key {files.key} is encrypted; give the server an unencrypted PEM key "
            "(as cert-manager writes it)"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"--tls-cert {files.cert} and --tls-key {files.key} are not a PEM certificate "
            f"and its private key ({exc})"
        ) from None
    if client_ca is not None:
        try:
            ssl.create_default_context(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as exc:
            raise TLSConfigError(
                f"--tls-client-ca {files.client_ca} is not a PEM CA bundle ({exc})"
            ) from None
    return CertificateSet(cert, key, client_ca, stamp)


class CertificateWatcher:
    """The current certificate set; :meth:`changed` reports a new usable one. Thread-safe."""

    def __init__(self, files: TLSFiles, name: str) -> None:
        self.files = files
        self._name = name
        self._lock = threading.Lock()
        self.current = read_certificates(files)  # unusable files at start are fatal
        self.reloads = 0
        # The files as they were when last found unusable: not read (or logged) again.
        self._refused_stamp: tuple[tuple[int, int, int], ...] | None = None
        self._last_error: str | None = None

    def changed(self) -> CertificateSet | None:
        """The new set when the files changed to usable ones since the last call, else None."""
        with self._lock:
            stamp = None
            try:
                stamp = _stamp(self.files)
                if stamp in (self.current.stamp, self._refused_stamp):
                    return None
                fresh = read_certificates(self.files)
            except (TLSConfigError, OSError) as exc:
                self._refused_stamp = stamp
                if str(exc) != self._last_error:  # once per problem, not per handshake
                    self._last_error = str(exc)
                    log.error(
                        "TLS files changed but cannot be used; keeping the last ones for the "
                        "%s: %s",
                        self._name,
                        exc,
                    )
                return None
            self._last_error = None
            if fresh.same_contents(self.current):
                self.current = fresh  # touched, not changed
                return None
            log.info(
                "TLS certificate for the %s reloaded from %s (sha256 %s..., was %s...)",
                self._name,
                self.files.cert,
                fresh.fingerprint,
                self.current.fingerprint,
            )
            self.current = fresh
            self.reloads += 1
            return fresh
