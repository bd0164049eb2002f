"""TLS and mTLS server credentials that follow the certificate files as they change.

cert-manager rotates a Secret under a running pod and the kubelet swaps the
mounted files; gRPC asks :class:`ReloadingCertificates` for the configuration at
each new handshake, and it re-reads the files when they changed, so a rotated
certificate is served without a restart. A half-written or mismatched pair is
refused and the last good one stays in use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

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
class _Pair:
    cert: bytes
    key: bytes
    client_ca: bytes | None
    stamp: tuple[tuple[int, int, int], ...]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert).hexdigest()[:12]


def _stamp(files: TLSFiles) -> tuple[tuple[int, int, int], ...]:
    stamps = []
    for path in files.paths():
        status = os.stat(path)  # follows the symlinks a Secret volume swaps
        stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
    return tuple(stamps)


def _read(files: TLSFiles) -> _Pair:
    """Read and check the files; raises TLSConfigError saying what is wrong."""
    try:
        stamp = _stamp(files)
        cert, key = files.cert.read_bytes(), files.key.read_bytes()
        client_ca = files.client_ca.read_bytes() if files.client_ca else None
    except OSError as exc:
        raise TLSConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        # The stdlib's OpenSSL checks that the key belongs to the certificate.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"--tls-cert {files.cert} and --tls-key {files.key} are not a PEM certificate "
            f"and its private key ({exc})"
        ) from None
    if files.client_ca is not None:
        try:
            ssl.create_default_context(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(
                f"--tls-client-ca {files.client_ca} is not a PEM CA bundle ({exc})"
            ) from None
    return _Pair(cert, key, client_ca, stamp)


def _configuration(pair: _Pair) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(pair.key, pair.cert)], root_certificates=pair.client_ca
    )


class ReloadingCertificates:
    """gRPC's certificate-configuration fetcher: a new configuration when the files change."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self.current = _read(files)  # unusable files at start are fatal
        self.reloads = 0

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return _configuration(self.current)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC (on its own thread) before each handshake; None keeps the last."""
        with self._lock:
            try:
                if _stamp(self.files) == self.current.stamp:
                    return None
                pair = _read(self.files)
            except (TLSConfigError, OSError) as exc:
                log.error("TLS files changed but cannot be used; keeping the last ones: %s", exc)
                return None
            if (pair.cert, pair.key, pair.client_ca) == (
                self.current.cert,
                self.current.key,
                self.current.client_ca,
            ):
                self.current = pair  # touched, not changed
                return None
            log.info(
                "TLS certificate reloaded from %s (sha256 %s..., was %s...)",
                self.files.cert,
                pair.fingerprint,
                self.current.fingerprint,
            )
            self.current = pair
            self.reloads += 1
            return _configuration(pair)


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """TLS (mTLS with a client CA) credentials that pick up rotated files."""
    fetcher = ReloadingCertificates(files)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial(),
        fetcher,
        require_client_authentication=files.client_ca is not None,
    )
