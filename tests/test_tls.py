"""TLS and mTLS on the gRPC port, certificate rotation, and the plaintext health port.

Every certificate is real (tests/certs.py); every call goes through a real channel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_stream.app import LLMStreamServer
from llm_stream.client import InferenceClient, channel_credentials
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from tests.certs import CertificateAuthority, Issued
from tests.conftest import (
    collect_stream,
    free_port,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.test_client import run_client

HEALTH = health_pb2.HealthCheckRequest(service="inference.v1.InferenceService")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


async def predict_over(
    port: int, credentials: grpc.ChannelCredentials | None, timeout: float = 10
) -> str:
    """One Predict through a fresh channel (so a fresh handshake)."""
    target = f"127.0.0.1:{port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        channel = grpc.aio.secure_channel(target, credentials)
    async with channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        response = await stub.Predict(prompt_request("Hello", max_tokens=3), timeout=timeout)
        return str(response.text)


async def refused(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await predict_over(port, credentials, timeout=5)
    return raised.value


def install(issued: Issued, cert: Path, key: Path) -> None:
    """Replace the served files the way a Secret volume does: new files, then a rename."""
    for source, target in ((issued.cert, cert), (issued.key, key)):
        staging = target.with_suffix(".new")
        staging.write_bytes(source.read_bytes())
        os.replace(staging, target)


async def test_tls_serves_tls_clients_and_refuses_plaintext(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority
) -> None:
    server_cert = ca.issue_server()
    settings = tiny_settings(
        tiny_model_dir, cache_dir, tls_cert=server_cert.cert, tls_key=server_cert.key
    )
    credentials = channel_credentials(ca.cert)
    async with running_server(settings, credentials=credentials) as running:
        tokens = await collect_stream(running.stub, prompt_request("Hello", max_tokens=4))
        assert tokens[-1].is_final
        assert await predict_over(running.server.port, credentials)

        # Plaintext on a TLS port never reaches the service.
        error = await refused(running.server.port, None)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        # Nor does a client that trusts another CA.
        other = CertificateAuthority(ca.folder.parent / "other", name="other CA")
        error = await refused(running.server.port, channel_credentials(other.cert))
        assert error.code() is grpc.StatusCode.UNAVAILABLE

        # The project's own client speaks TLS with a CA file.
        async with InferenceClient(f"127.0.0.1:{running.server.port}", ca_cert=ca.cert) as client:
            response = await client.predict("Hello", max_tokens=3)
            assert response.usage.completion_tokens > 0


async def test_mtls_refuses_clients_without_a_certificate_from_the_ca(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority
) -> None:
    server_cert = ca.issue_server()
    client_cert = ca.issue_client()
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=server_cert.cert,
        tls_key=server_cert.key,
        tls_client_ca=ca.cert,
    )
    good = channel_credentials(ca.cert, client_cert.cert, client_cert.key)
    async with running_server(settings, credentials=good) as running:
        port = running.server.port
        assert await predict_over(port, good)

        # No client certificate: refused at the handshake, before any RPC.
        error = await refused(port, channel_credentials(ca.cert))
        assert error.code() is grpc.StatusCode.UNAVAILABLE

        # A certificate from a CA the server does not trust: refused too.
        stranger_ca = CertificateAuthority(ca.folder.parent / "stranger", name="stranger CA")
        stranger = stranger_ca.issue_client("stranger")
        error = await refused(port, channel_credentials(ca.cert, stranger.cert, stranger.key))
        assert error.code() is grpc.StatusCode.UNAVAILABLE

        async with InferenceClient(
            f"127.0.0.1:{port}",
            ca_cert=ca.cert,
            client_cert=client_cert.cert,
            client_key=client_cert.key,
        ) as client:
            assert (await client.predict("Hello", max_tokens=2)).usage.completion_tokens > 0


async def test_rotated_certificates_are_served_without_a_restart(
    tiny_model_dir: Path,
    cache_dir: Path,
    ca: CertificateAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "tls.crt", served / "tls.key"
    install(ca.issue_server(), cert, key)
    settings = tiny_settings(tiny_model_dir, cache_dir, tls_cert=cert, tls_key=key)
    old_trust = channel_credentials(ca.cert)
    async with running_server(settings, credentials=old_trust) as running:
        port = running.server.port
        assert await predict_over(port, old_trust)
        # This channel connects now, before the rotation.
        assert (await running.stub.Predict(prompt_request("first", max_tokens=2))).text

        # cert-manager renews with a new issuer: new connections get the new pair.
        new_ca = CertificateAuthority(tmp_path / "new-ca", name="renewed CA")
        new_trust = channel_credentials(new_ca.cert)
        install(new_ca.issue_server(), cert, key)
        assert await predict_over(port, new_trust)
        error = await refused(port, old_trust)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        # The connection opened before the rotation keeps working.
        assert (await running.stub.Predict(prompt_request("still", max_tokens=2))).text

        # A broken pair (a key that does not match) is refused; the last good one stays.
        with caplog.at_level(logging.ERROR, logger="llm_stream.tls_files"):
            key.write_bytes(ca.issue_server("mismatch").key_pem)
            for _ in range(3):  # three handshakes: one log line, not one per handshake
                assert await predict_over(port, new_trust)
        assert caplog.text.count("keeping the last ones") == 1


async def test_a_secret_volume_swap_is_picked_up(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The kubelet's layout: tls.crt -> ..data/tls.crt, ..data -> a timestamped folder,
    and an update renames a new ..data symlink over the old one."""
    volume = tmp_path / "volume"
    volume.mkdir()

    def publish(issued: Issued, version: str) -> None:
        folder = volume / version
        folder.mkdir()
        (folder / "tls.crt").write_bytes(issued.cert_pem)
        (folder / "tls.key").write_bytes(issued.key_pem)
        (volume / "..data_tmp").symlink_to(version)
        os.replace(volume / "..data_tmp", volume / "..data")

    publish(ca.issue_server(), "..2026_11_25_1")
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    settings = tiny_settings(
        tiny_model_dir, cache_dir, tls_cert=volume / "tls.crt", tls_key=volume / "tls.key"
    )
    old_trust = channel_credentials(ca.cert)
    async with running_server(settings, credentials=old_trust) as running:
        assert await predict_over(running.server.port, old_trust)
        new_ca = CertificateAuthority(tmp_path / "new-ca", name="renewed CA")
        publish(new_ca.issue_server(), "..2026_11_25_2")
        assert await predict_over(running.server.port, channel_credentials(new_ca.cert))


async def test_health_port_serves_only_health_in_plaintext(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority
) -> None:
    server_cert = ca.issue_server()
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=server_cert.cert,
        tls_key=server_cert.key,
        tls_client_ca=ca.cert,
        health_port=free_port(),
    )
    client_cert = ca.issue_client()
    credentials = channel_credentials(ca.cert, client_cert.cert, client_cert.key)
    async with running_server(settings, credentials=credentials) as running:
        assert running.server.health_port == settings.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.server.health_port}") as plain:
            health = health_pb2_grpc.HealthStub(plain)
            response = await health.Check(HEALTH, timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            # Nothing else is served there.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pb_grpc.InferenceServiceStub(plain).Predict(
                    prompt_request("Hello", max_tokens=2), timeout=5
                )
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED

            # Draining shows on the health port too.
            await running.server.health.mark_draining()
            response = await health.Check(HEALTH, timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("which", "fragment"),
    [
        ("cert", "--tls-cert"),
        ("key", "cannot read"),
        ("ca", "--tls-client-ca"),
        ("encrypted", "is encrypted"),
    ],
)
async def test_unusable_tls_files_stop_the_start_with_a_clear_error(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority, which: str, fragment: str
) -> None:
    server_cert = ca.issue_server()
    garbage = ca.folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    files = {"cert": server_cert.cert, "key": server_cert.key, "ca": ca.cert}
    if which == "cert":
        files["cert"] = garbage
    elif which == "key":
        files["key"] = ca.folder / "missing.key"
    elif which == "encrypted":
        # A passphrase-protected key must fail at once, never prompt on the terminal.
        key = serialization.load_pem_private_key(server_cert.key_pem, password=None)
        files["key"] = ca.folder / "encrypted.key"
        files["key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
    else:
        files["ca"] = garbage
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=files["cert"],
        tls_key=files["key"],
        tls_client_ca=files["ca"],
    )
    server = LLMStreamServer(settings)
    with pytest.raises(OSError, match=r"cannot serve TLS") as raised:
        await server.start()
    assert fragment in str(raised.value)


async def test_cli_speaks_mtls(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority
) -> None:
    server_cert, client_cert = ca.issue_server(), ca.issue_client()
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=server_cert.cert,
        tls_key=server_cert.key,
        tls_client_ca=ca.cert,
    )
    async with running_server(settings, wait_ready=True) as running:
        target = ("--target", f"localhost:{running.server.port}", "--max-tokens", "3")
        tls = ("--ca-cert", str(ca.cert))
        mtls = (*tls, "--client-cert", str(client_cert.cert), "--client-key", str(client_cert.key))
        code, out, err = await run_client(*target, *mtls, "--raw", "Hello")
        assert code == 0, err
        assert "finish=" in err
        # Without a client certificate the handshake fails: a readable one-line error at
        # once, not after the whole --wait.
        started = time.monotonic()
        code, out, err = await run_client(*target, *tls, "--wait", "60", "Hello")
        assert code == 1 and out == "" and "Traceback" not in err
        assert "TLS mismatch" in err and "--client-cert" in err, err
        assert time.monotonic() - started < 30
        # Plaintext against the TLS port, and TLS trusting another CA: the same.
        other = CertificateAuthority(ca.folder.parent / "other", name="other CA")
        for security, says in (((), "TLS mismatch"), (("--ca-cert", str(other.cert)), "over TLS")):
            code, _, err = await run_client(*target, *security, "--wait", "60", "Hello")
            assert code == 1 and "Traceback" not in err and says in err, err
        assert time.monotonic() - started < 60
        code, _, err = await run_client(*target, "--client-cert", str(client_cert.cert), "x")
        assert code == 2 and "--client-key" in err


async def test_http_port_serves_https_with_the_same_certificates(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The OpenAI-compatible port is HTTPS (and mTLS) too, and follows rotations."""
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "tls.crt", served / "tls.key"
    install(ca.issue_server(), cert, key)
    client_cert = ca.issue_client()
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=cert,
        tls_key=key,
        tls_client_ca=ca.cert,
        http_port=free_port(),
    )
    good = channel_credentials(ca.cert, client_cert.cert, client_cert.key)
    async with running_server(settings, credentials=good) as running:
        url = f"https://localhost:{running.server.http_port}/v1/models"

        def client(trust: Path, with_cert: bool = True) -> httpx.AsyncClient:
            context = ssl.create_default_context(cafile=trust)
            if with_cert:
                context.load_cert_chain(client_cert.cert, client_cert.key)
            return httpx.AsyncClient(verify=context, timeout=10)

        async with client(ca.cert) as http:
            response = await http.get(url)
        assert response.status_code == 200
        assert response.json()["data"][0]["id"] == "tiny"

        # Plaintext, or TLS without a client certificate, never reaches the API.
        async with httpx.AsyncClient(timeout=10) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(url.replace("https://", "http://"))
        async with client(ca.cert, with_cert=False) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(url)

        # A renewed certificate from a new issuer reaches new HTTPS connections.
        new_ca = CertificateAuthority(tmp_path / "new-ca", name="renewed CA")
        install(new_ca.issue_server(), cert, key)

        async def served_by_new_ca() -> None:
            while True:
                try:
                    async with client(new_ca.cert) as http:
                        if (await http.get(url)).status_code == 200:
                            return
                except httpx.HTTPError:
                    await asyncio.sleep(0.25)

        await asyncio.wait_for(served_by_new_ca(), 15)


async def test_a_rotated_client_ca_replaces_the_old_one_on_both_ports(
    tiny_model_dir: Path, cache_dir: Path, ca: CertificateAuthority, tmp_path: Path
) -> None:
    """After the client CA file changes, certificates of the old CA are refused (the old
    CA is not kept beside the new one) on the gRPC port and the HTTPS port alike."""
    server_cert = ca.issue_server()
    client_ca = tmp_path / "client-ca.crt"
    old_ca = CertificateAuthority(tmp_path / "old-client-ca", name="old client CA")
    new_ca = CertificateAuthority(tmp_path / "new-client-ca", name="new client CA")
    old_client, new_client = old_ca.issue_client("old"), new_ca.issue_client("new")
    client_ca.write_bytes(old_ca.cert_pem)
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=server_cert.cert,
        tls_key=server_cert.key,
        tls_client_ca=client_ca,
        http_port=free_port(),
    )

    def grpc_credentials(issued: Issued) -> grpc.ChannelCredentials:
        return channel_credentials(ca.cert, issued.cert, issued.key)

    async def https_status(issued: Issued) -> int | None:
        context = ssl.create_default_context(cafile=ca.cert)
        context.load_cert_chain(issued.cert, issued.key)
        url = f"https://localhost:{running.server.http_port}/v1/models"
        try:
            async with httpx.AsyncClient(verify=context, timeout=10) as http:
                return (await http.get(url)).status_code
        except httpx.HTTPError:
            return None

    async with running_server(settings, credentials=grpc_credentials(old_client)) as running:
        port = running.server.port
        assert await predict_over(port, grpc_credentials(old_client))
        assert await https_status(old_client) == 200

        staging = client_ca.with_suffix(".new")
        staging.write_bytes(new_ca.cert_pem)
        os.replace(staging, client_ca)

        assert await predict_over(port, grpc_credentials(new_client))
        error = await refused(port, grpc_credentials(old_client))
        assert error.code() is grpc.StatusCode.UNAVAILABLE

        async def https_takes_the_new_ca() -> None:
            while await https_status(new_client) != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.25)

        await asyncio.wait_for(https_takes_the_new_ca(), 15)
        assert await https_status(old_client) is None
