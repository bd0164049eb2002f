"""A real Envoy (deploy/envoy.yaml) in front of real replicas on loopback.

Needs the Envoy binary from scripts/install_tools.sh; without it these tests
fail (they never skip), so CI cannot pass while silently not testing Envoy.
The upstream TLS tests run the config the chart renders with tls.enabled
(scripts/render_envoy.py's UpstreamTls; check_deploy.sh checks they agree) against
replicas serving TLS with real certificates (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from llm_stream.app import load_configured_models
from llm_stream.client import InferenceClient, reset_as_unavailable
from llm_stream.engine.types import ModelBackend
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings
from tests.certs import CertificateAuthority
from tests.conftest import (
    RunningServer,
    free_port,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.envoy_proxy import envoy_in_front, render_module
from tests.wrapped_backend import slow_models

pytestmark = pytest.mark.deploy

SPREAD_RPCS = 40


def upstream_tls(ca: Path, server_name: str, client: Any = None) -> Any:
    """render_envoy.UpstreamTls; ``client``: a tests.certs.Issued for mTLS."""
    return render_module().UpstreamTls(
        ca=ca,
        server_name=server_name,
        client_cert=client.cert if client else None,
        client_key=client.key if client else None,
    )


class SecretVolume:
    """A folder laid out as the kubelet writes a Secret volume.

    Each file is a link to ``..data/<name>``, and ``..data`` links to a folder holding
    one version of all the files; an update writes a new version and swaps ``..data``
    with one rename, which is how a rotated certificate reaches a running pod.
    """

    def __init__(self, folder: Path, files: dict[str, bytes]) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self._version = 0
        self.update(files)
        for name in files:
            (folder / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        self._version += 1
        version = self.folder / f"..version-{self._version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staging = self.folder / "..data_tmp"
        staging.symlink_to(version.name)
        os.replace(staging, self.folder / "..data")

    def __truediv__(self, name: str) -> Path:
        return self.folder / name


def served(replica: RunningServer, prefix: str) -> int:
    return sum(r.request_id.startswith(prefix) for r in replica.server.engine.finished)


def tagged(prefix: str, index: int, **config: object) -> pb.PredictRequest:
    request = prompt_request("Hello world", **config)
    request.request_id = f"{prefix}{index}"
    return request


@contextlib.asynccontextmanager
async def replicas(
    count: int, tiny_model_dir: Path, cache_dir: Path, **overrides: object
) -> AsyncIterator[list[RunningServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_server(tiny_settings(tiny_model_dir, cache_dir, **overrides))
            )
            for _ in range(count)
        ]


async def test_unary_and_streams_spread_over_replicas(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    async with (
        replicas(2, tiny_model_dir, cache_dir) as (first, second),
        envoy_in_front([first, second], tmp_path) as envoy,
    ):
        for port in envoy.upstream_ports:
            await envoy.wait_health(port, healthy=True)
        # Least-request over idle replicas is a coin flip per RPC: 40 RPCs make
        # "each replica got at least 8" fail about once in a million runs.
        for i in range(SPREAD_RPCS):
            await envoy.stub.Predict(tagged("unary-", i, max_tokens=2), timeout=30)
        for i in range(SPREAD_RPCS):
            tokens = [t async for t in envoy.stub.StreamPredict(tagged("stream-", i, max_tokens=4))]
            assert tokens[-1].is_final
        for prefix in ("unary-", "stream-"):
            counts = served(first, prefix), served(second, prefix)
            assert sum(counts) == SPREAD_RPCS
            assert min(counts) >= SPREAD_RPCS // 5, counts


async def test_stopped_replica_gets_no_more_requests(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    async with (
        replicas(2, tiny_model_dir, cache_dir) as (keeper, leaver),
        envoy_in_front([keeper, leaver], tmp_path) as envoy,
    ):
        for port in envoy.upstream_ports:
            await envoy.wait_health(port, healthy=True)
        await leaver.server.drain(grace_s=0)
        # No waiting for Envoy to notice: retries and health checks must cover it.
        for i in range(10):
            response = await envoy.stub.Predict(tagged("after-", i, max_tokens=2), timeout=30)
            assert response.usage.completion_tokens > 0
            tokens = [t async for t in envoy.stub.StreamPredict(tagged("after-s", i, max_tokens=3))]
            assert tokens[-1].is_final
        assert served(keeper, "after-") == 20


async def test_warming_replica_gets_no_traffic(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    release = threading.Event()

    def load_when_released(settings: Settings) -> Sequence[ModelBackend]:
        release.wait(timeout=60)
        return load_configured_models(settings)

    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with (
        running_server(settings) as warm,
        running_server(settings, wait_ready=False, load_models=load_when_released) as cold,
        envoy_in_front([warm, cold], tmp_path) as envoy,
    ):
        await envoy.wait_health(warm.server.port, healthy=True)
        await envoy.wait_health(cold.server.port, healthy=False)
        for i in range(12):
            await envoy.stub.Predict(tagged("early-", i, max_tokens=2), timeout=30)
        assert served(warm, "early-") == 12
        assert cold.server.engine.finished == type(cold.server.engine.finished)()
        release.set()
        assert cold.server.ready is not None
        await asyncio.wait_for(asyncio.shield(cold.server.ready), 60)
        await envoy.wait_health(cold.server.port, healthy=True)
        for i in range(SPREAD_RPCS):
            await envoy.stub.Predict(tagged("late-", i, max_tokens=2), timeout=30)
        # Once warm it joins the rotation (the first few RPCs may still see the old
        # host set while Envoy's workers catch up with the health verdict).
        assert served(cold, "late-") >= SPREAD_RPCS // 5


async def test_stream_longer_than_default_timeouts_passes_whole(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Envoy's default route timeout is 15 s; this stream lasts about 17 s."""
    tokens_wanted, delay = 170, 0.1
    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with (
        running_server(settings, load_models=slow_models(delay)) as slow,
        envoy_in_front([slow], tmp_path) as envoy,
    ):
        await envoy.wait_health(slow.server.port, healthy=True)
        request = prompt_request("Hello world", max_tokens=tokens_wanted)
        started = time.monotonic()

        async def through_envoy() -> list[pb.PredictToken]:
            return [t async for t in envoy.stub.StreamPredict(request, timeout=120)]

        tokens, direct = await asyncio.gather(through_envoy(), slow.stub.Predict(request))
        elapsed = time.monotonic() - started
    assert elapsed > 15, "the stream must outlast Envoy's default 15 s route timeout"
    assert tokens[-1].is_final
    assert tokens[-1].usage.completion_tokens == direct.usage.completion_tokens
    assert "".join(t.token for t in tokens[:-1]) == direct.text


# -- upstream TLS ----------------------------------------------------------------


async def test_upstream_mtls_streams_tokens_and_health_checks_over_tls(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Replicas with TLS, mTLS and API keys, as the chart runs them with Envoy in front."""
    ca = CertificateAuthority(tmp_path / "ca")
    served_cert = ca.issue_server()
    envoy_cert = ca.issue_client("envoy", name="llm-stream envoy")
    keys = tmp_path / "api-keys"
    keys.write_text("# clients\nsk-envoy-test-key\n")
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=served_cert.cert,
        tls_key=served_cert.key,
        tls_client_ca=ca.cert,
        api_keys_file=keys,
    )
    tls = upstream_tls(ca.cert, "localhost", envoy_cert)
    async with (
        running_server(settings) as replica,
        envoy_in_front([replica], tmp_path, tls) as envoy,
    ):
        # Envoy's gRPC health checks carry no API key and must pass TLS and mTLS:
        # the replica's port speaks nothing else.
        await envoy.wait_health(replica.server.port, healthy=True)
        stats = await asyncio.to_thread(envoy.stats)
        assert stats["ssl.handshake"] >= 1
        assert stats["health_check.success"] >= 1

        auth = (("authorization", "Bearer sk-envoy-test-key"),)
        tokens = [
            t
            async for t in envoy.stub.StreamPredict(
                tagged("tls-", 0, max_tokens=4), metadata=auth, timeout=30
            )
        ]
        assert len(tokens) >= 2 and tokens[-1].is_final
        response = await envoy.stub.Predict(
            tagged("tls-", 1, max_tokens=2), metadata=auth, timeout=30
        )
        assert response.usage.completion_tokens > 0
        assert served(replica, "tls-") == 2

        # The key travels through Envoy untouched: without one the replica refuses.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await envoy.stub.Predict(tagged("nokey-", 0, max_tokens=2), timeout=30)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_upstream_tls_checks_the_replica_and_follows_a_rotated_ca(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """A CA that did not sign the replica fails the handshake; the right one, swapped
    into the mounted folder as the kubelet does, is picked up without a restart."""
    ca = CertificateAuthority(tmp_path / "ca")
    stranger = CertificateAuthority(tmp_path / "other-ca", name="some other CA")
    served_cert = ca.issue_server()
    trusted = SecretVolume(tmp_path / "upstream-ca", {"ca.crt": stranger.cert_pem})
    settings = tiny_settings(
        tiny_model_dir, cache_dir, tls_cert=served_cert.cert, tls_key=served_cert.key
    )
    tls = upstream_tls(trusted / "ca.crt", "localhost")
    async with (
        running_server(settings) as replica,
        envoy_in_front([replica], tmp_path, tls) as envoy,
    ):
        await envoy.wait_stat("ssl.fail_verify_error", at_least=2)
        assert (await asyncio.to_thread(envoy.health_flags))[replica.server.port] != "healthy"
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await envoy.stub.Predict(tagged("untrusted-", 0, max_tokens=2), timeout=30)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert served(replica, "untrusted-") == 0

        trusted.update({"ca.crt": ca.cert_pem})
        await envoy.wait_health(replica.server.port, healthy=True)
        tokens = [t async for t in envoy.stub.StreamPredict(tagged("rotated-", 0, max_tokens=3))]
        assert tokens[-1].is_final
        assert served(replica, "rotated-") == 1


async def test_upstream_tls_requires_the_server_name_in_the_certificate(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Signed by the trusted CA is not enough: the certificate must name the server."""
    ca = CertificateAuthority(tmp_path / "ca")
    served_cert = ca.issue_server()  # names localhost, 127.0.0.1 and ::1 only
    settings = tiny_settings(
        tiny_model_dir, cache_dir, tls_cert=served_cert.cert, tls_key=served_cert.key
    )
    tls = upstream_tls(ca.cert, "llm-stream-headless.inference.svc.cluster.local")
    async with (
        running_server(settings) as replica,
        envoy_in_front([replica], tmp_path, tls) as envoy,
    ):
        await envoy.wait_stat("ssl.fail_verify_san", at_least=2)
        stats = await asyncio.to_thread(envoy.stats)
        assert stats.get("health_check.success", 0) == 0
        assert (await asyncio.to_thread(envoy.health_flags))[replica.server.port] != "healthy"


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def replica_command(tiny_model_dir: Path, workdir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "llm_stream.serve", "--host", "127.0.0.1", "--port", str(port),
        "--http-port", "0", "--model", f"tiny={tiny_model_dir}",
        "--cache-dir", str(workdir / "cache"), "--max-tokens-cap", "4000",
    ]  # fmt: skip


@contextlib.asynccontextmanager
async def replica_process(
    tiny_model_dir: Path, workdir: Path, port: int | None = None, wait: bool = True
) -> AsyncIterator[Any]:
    """A replica in a process of its own (one that can be killed), on the tiny model;
    yields what envoy_in_front needs of a replica (``.server.port``) and ``.process``.
    ``wait``: until it reports SERVING."""
    port = port or free_port()
    name = f"replica-{port}.log"
    process = spawn(replica_command(tiny_model_dir, workdir, port), workdir / name)
    try:
        if wait:
            async with InferenceClient(f"127.0.0.1:{port}") as client:
                await client.wait_ready(timeout=120)
        yield types.SimpleNamespace(server=types.SimpleNamespace(port=port), process=process)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


async def test_a_replica_killed_mid_stream_is_unavailable_to_the_client_not_internal(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Envoy can only reset a stream it has begun; gRPC calls that INTERNAL. The
    project's client reports it as UNAVAILABLE (retryable), within moments."""
    async with (
        replica_process(tiny_model_dir, tmp_path) as replica,
        envoy_in_front([replica], tmp_path) as envoy,
    ):
        await envoy.wait_health(replica.server.port, healthy=True)

        async def killed_after(tokens: int, stream: AsyncIterator[Any]) -> tuple[int, Any, float]:
            seen, killed_at = 0, 0.0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    seen += 1
                    if seen == tokens:
                        replica.process.kill()
                        killed_at = time.monotonic()
            return seen, caught.value, time.monotonic() - killed_at

        async with InferenceClient(f"127.0.0.1:{envoy.port}") as client:
            seen, error, took = await killed_after(
                20, client.stream("Hello", max_tokens=3000, timeout=60)
            )
    assert seen >= 20
    assert error.code() is grpc.StatusCode.UNAVAILABLE, error
    assert "reset" in (error.details() or "") and "sent again" in (error.details() or "")
    assert took < 2.0


def test_only_a_reset_is_taken_for_unavailable() -> None:
    def error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    reset = error(
        grpc.StatusCode.INTERNAL,
        "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))",
    )
    assert reset_as_unavailable(reset).code() is grpc.StatusCode.UNAVAILABLE
    bug = error(grpc.StatusCode.INTERNAL, "internal error; see the server log for request x")
    assert reset_as_unavailable(bug) is bug
    other = error(grpc.StatusCode.INVALID_ARGUMENT, "RST_STREAM in a prompt")
    assert reset_as_unavailable(other) is other


async def test_wait_ready_through_envoy_waits_for_a_healthy_replica(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Envoy answers "no healthy upstream" (UNAVAILABLE) until a replica is ready: the
    client's wait_ready waits that out instead of failing."""
    port = free_port()
    upstream = types.SimpleNamespace(server=types.SimpleNamespace(port=port))
    async with (
        envoy_in_front([upstream], tmp_path) as envoy,  # type: ignore[list-item]
        InferenceClient(f"127.0.0.1:{envoy.port}") as client,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.check()
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        async with replica_process(tiny_model_dir, tmp_path, port=port, wait=False):
            await client.wait_ready(timeout=120)
            response = await client.predict("Hello", max_tokens=3, timeout=30)
    assert response.usage.completion_tokens == 3


async def test_a_stream_cut_by_a_dying_replica_resumes_on_another(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """stream(resume=True): the replica serving a stream is killed mid-way; the client
    carries the answer on through Envoy on the other replica, as one stream."""
    async with (
        replica_process(tiny_model_dir, tmp_path) as first,
        replica_process(tiny_model_dir, tmp_path) as second,
        envoy_in_front([first, second], tmp_path) as envoy,
    ):
        for replica in (first, second):
            await envoy.wait_health(replica.server.port, healthy=True)
        # Only the first takes the stream: the second is frozen until Envoy ejects it.
        second.process.send_signal(signal.SIGSTOP)
        await envoy.wait_health(second.server.port, healthy=False)
        tokens: list[Any] = []
        killed_at = 0
        async with InferenceClient(f"127.0.0.1:{envoy.port}") as client:
            async for token in client.stream("Hello", max_tokens=2000, timeout=120, resume=True):
                tokens.append(token)
                if len(tokens) == 1:
                    second.process.send_signal(signal.SIGCONT)
                    healthy = asyncio.create_task(
                        envoy.wait_health(second.server.port, healthy=True)
                    )
                elif not killed_at and healthy.done():
                    first.process.kill()
                    killed_at = len(tokens)
    assert killed_at, "the stream ended before the second replica was back"
    assert first.process.wait(timeout=10) == -signal.SIGKILL
    final = tokens[-1]
    assert final.is_final and final.finish_reason == pb.FINISH_REASON_LENGTH
    assert [t.token_index for t in tokens] == list(range(len(tokens)))
    assert final.token_index == len(tokens) - 1 == final.usage.completion_tokens
    assert len(tokens) - 1 == 2000
