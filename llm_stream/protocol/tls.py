"""TLS and mTLS credentials for the gRPC port that follow the certificate files.

gRPC asks the fetcher for a configuration before each new handshake; it answers
with a new one when :class:`~llm_stream.tls_files.CertificateWatcher` saw the
files change, so a rotated certificate is served without a restart.
"""

from __future__ import annotations

import grpc

from llm_stream.tls_files import CertificateSet, CertificateWatcher, TLSFiles


def _configuration(certificates: CertificateSet) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(certificates.key, certificates.cert)], root_certificates=certificates.client_ca
    )


def server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """TLS (mTLS with a client CA) credentials that pick up rotated files.

    Raises TLSConfigError when the files cannot be used."""
    watcher = CertificateWatcher(files, "gRPC port")

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC, on its own thread, before each handshake; None keeps the last.
        fresh = watcher.changed()
        return None if fresh is None else _configuration(fresh)

    return grpc.dynamic_ssl_server_credentials(
        _configuration(watcher.current),
        fetch,
        require_client_authentication=files.client_ca is not None,
    )
