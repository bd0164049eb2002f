"""Health through warm-up and drain, in-process and on the real CLI with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_stream import healthcheck
from llm_stream.app import load_configured_models
from llm_stream.engine.types import FinishReason, ModelBackend
from llm_stream.errors import ModelLoadError
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.settings import Settings
from tests.certs import CertificateAuthority
from tests.conftest import (
    RunningServer,
    collect_stream,
    free_port,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.wrapped_backend import slow_models

SERVICES = ("", "inference.v1.InferenceService", "InferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HANG_GUARD_S = 60


class Watcher:
    """A standard health Watch stream, read status by status."""

    def __init__(
        self, stub: health_pb2_grpc.HealthStub, service: str, wait_for_ready: bool = False
    ) -> None:
        self.call = stub.Watch(
            health_pb2.HealthCheckRequest(service=service), wait_for_ready=wait_for_ready
        )

    async def until(self, status: int) -> None:
        async def read() -> None:
            while True:
                response = await self.call.read()
                assert response is not grpc.aio.EOF, "health Watch ended"
                if response.status == status:
                    return

        await asyncio.wait_for(read(), HANG_GUARD_S)

    async def next_status(self) -> int:
        response = await asyncio.wait_for(self.call.read(), HANG_GUARD_S)
        assert response is not grpc.aio.EOF
        return int(response.status)


async def all_statuses(running: RunningServer) -> tuple[list[int], int]:
    standard = [
        int((await running.health.Check(health_pb2.HealthCheckRequest(service=s))).status)
        for s in SERVICES
    ]
    contract = [
        int((await running.stub.Check(pb.HealthCheckRequest(service=s))).status) for s in SERVICES
    ]
    assert len(set(contract)) == 1
    return standard, contract[0]


async def assert_unavailable(
    stub: pb_grpc.InferenceServiceStub, *fragments: str
) -> list[grpc.aio.AioRpcError]:
    request = prompt_request("Hello world", max_tokens=3)
    attempts = [
        stub.Predict(request, timeout=10),
        collect_stream(stub, request, timeout=10),
        stub.BatchPredict(pb.BatchPredictRequest(requests=[request]), timeout=10),
    ]
    errors = []
    for attempt in attempts:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await attempt
        details = raised.value.details() or ""
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE, details
        for fragment in fragments:
            assert fragment in details, details
        errors.append(raised.value)
    return errors


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[pb.PredictToken]:
    """The remaining messages of a stream already read with ``read()``."""
    tokens = []
    while (token := await asyncio.wait_for(call.read(), HANG_GUARD_S)) is not grpc.aio.EOF:
        tokens.append(token)
    return tokens


# -- warm-up ---------------------------------------------------------------------


async def test_not_serving_until_loaded_and_warmed_up(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    gate = threading.Event()

    def slow_load(settings: Settings) -> Sequence[ModelBackend]:
        if not gate.wait(HANG_GUARD_S):
            raise TimeoutError("the test never released the model load")
        return load_configured_models(settings)

    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with running_server(settings, wait_ready=False, load_models=slow_load) as running:
        try:
            # The port answers at once, while the model is still "loading".
            watchers = [Watcher(running.health, s) for s in SERVICES]
            for watcher in watchers:
                assert await watcher.next_status() == NOT_SERVING
            standard, contract = await all_statuses(running)
            assert standard == [NOT_SERVING] * 3
            assert contract == pb.HealthCheckResponse.NOT_SERVING
            await assert_unavailable(running.stub, "loading or warming up", "SERVING")
            assert running.server.ready is not None and not running.server.ready.done()
        finally:
            gate.set()

        for watcher in watchers:
            await watcher.until(SERVING)
            watcher.call.cancel()
        standard, contract = await all_statuses(running)
        assert standard == [SERVING] * 3
        assert contract == pb.HealthCheckResponse.SERVING
        response = await running.stub.Predict(prompt_request("Hello world", max_tokens=3))
        assert response.usage.completion_tokens > 0


async def test_failed_load_stays_not_serving(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, models=("/nonexistent/llm-stream-model",))
    async with running_server(settings, wait_ready=False) as running:
        assert running.server.ready is not None
        with pytest.raises(ModelLoadError, match="does not exist"):
            await asyncio.wait_for(asyncio.shield(running.server.ready), HANG_GUARD_S)
        standard, contract = await all_statuses(running)
        assert standard == [NOT_SERVING] * 3
        assert contract == pb.HealthCheckResponse.NOT_SERVING
        await assert_unavailable(running.stub)


# -- drain -----------------------------------------------------------------------


@pytest.fixture
async def throttled_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """A model paced at 10 ms a step, so a long generation is still running at drain."""
    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with running_server(settings, load_models=slow_models(0.01)) as running:
        yield running


async def test_drain_flips_health_first_and_finishes_in_flight_stream(
    throttled_server: RunningServer,
) -> None:
    running = throttled_server
    request = prompt_request("Hello world", max_tokens=400)
    request.request_id = "in-flight-at-drain"
    stream = running.stub.StreamPredict(request)
    first = await stream.read()
    assert first.token_index == 0
    assert running.server.engine.in_flight == 1  # still generating: 400 steps take 4 s

    watcher = Watcher(running.health, "")
    assert await watcher.next_status() == SERVING
    drain = asyncio.create_task(running.server.drain(grace_s=30))
    assert await watcher.next_status() == NOT_SERVING
    # The Watch ends by itself once it has said NOT_SERVING, so it cannot hold the drain.
    assert await asyncio.wait_for(watcher.call.read(), HANG_GUARD_S) is grpc.aio.EOF
    assert await watcher.call.code() is grpc.StatusCode.OK
    await assert_unavailable(running.stub)
    assert not drain.done()

    rest = await read_rest(stream)
    final = rest[-1]
    assert final.is_final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 400 == len(rest)  # first + 399 tokens + final
    await asyncio.wait_for(drain, HANG_GUARD_S)
    record = await running.server.engine.wait_finished("in-flight-at-drain", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.LENGTH


async def test_drain_grace_expiry_cuts_the_stream_and_stops_the_model(
    throttled_server: RunningServer,
) -> None:
    running = throttled_server
    max_tokens = 3500
    request = prompt_request("Hello world", max_tokens=max_tokens)
    request.request_id = "outlives-grace"
    stream = running.stub.StreamPredict(request)
    await stream.read()
    await asyncio.wait_for(running.server.drain(grace_s=0.5), HANG_GUARD_S)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        tokens = await read_rest(stream)
        pytest.fail(f"the stream was not cut: {len(tokens)} more messages")
    assert raised.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), (
        raised.value
    )
    record = await running.server.engine.wait_finished("outlives-grace", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens < max_tokens // 4


# -- the real process: SIGTERM and a model that fails to load ---------------------


@contextlib.asynccontextmanager
async def serve_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_stream.serve",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []

    async def pump() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            lines.append(line.decode(errors="replace"))

    reader = asyncio.create_task(pump())
    try:
        yield process, lines
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await reader


async def test_sigterm_drains_then_exits_zero(tiny_model_dir: Path, cache_dir: Path) -> None:
    port, http_port = free_port(), free_port()
    args = ("--model", f"tiny={tiny_model_dir}", "--host", "127.0.0.1", "--port", str(port))
    # The HTTP API's uvicorn runs in the same loop: SIGTERM must still drain the server.
    args += ("--http-port", str(http_port))
    # The grace is a bound, not a wait: drain ends as soon as the stream has finished.
    args += ("--cache-dir", str(cache_dir), "--drain-grace", "20", "--max-tokens-cap", "4000")
    async with serve_process(*args) as (process, lines):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)
            watcher = Watcher(health, "InferenceService", wait_for_ready=True)
            await watcher.until(SERVING)  # the model loads in the child process

            stub = pb_grpc.InferenceServiceStub(channel)
            # Long enough (seconds, even on the tiny model) to be in flight at SIGTERM.
            stream = stub.StreamPredict(prompt_request("Hello world", max_tokens=2000))
            assert (await stream.read()).token_index == 0
            process.send_signal(signal.SIGTERM)
            await watcher.until(NOT_SERVING)  # health flips first, while draining
            watcher.call.cancel()
            rest = await read_rest(stream)  # the stream still finishes whole
            assert rest[-1].is_final
            assert rest[-1].usage.completion_tokens == 2000
            assert await asyncio.wait_for(process.wait(), HANG_GUARD_S) == 0
        finally:
            await channel.close()

    log = "".join(lines)
    ready_line = re.search(
        rf"ready: serving on 127\.0\.0\.1:{port} model=tiny version=(\S+) device=cpu", log
    )
    assert ready_line, log
    assert ready_line.group(1).startswith("sha256-")
    assert f"chat page on http://127.0.0.1:{http_port}/" in log
    assert "shutdown signal received" in log
    assert "Traceback" not in log


async def test_model_that_fails_to_load_exits_one(cache_dir: Path) -> None:
    args = ("--model", "/nonexistent/folder", "--host", "127.0.0.1", "--port", "0")
    args += ("--http-port", "0")
    async with serve_process(*args, "--cache-dir", str(cache_dir)) as (process, lines):
        assert await asyncio.wait_for(process.wait(), HANG_GUARD_S) == 1
    log = "".join(lines)
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, log
    assert "cannot start" in errors[0] and "'/nonexistent/folder' does not exist" in errors[0]
    assert "Traceback" not in log


async def test_open_health_watch_does_not_hold_the_drain(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """A watching client (gRPC client-side health checking) must not make every drain
    last its whole grace: with nothing else in flight the drain ends long before it."""
    async with running_server(tiny_settings(tiny_model_dir, cache_dir)) as running:
        watcher = Watcher(running.health, "inference.v1.InferenceService")
        assert await watcher.next_status() == SERVING
        await asyncio.wait_for(running.server.drain(grace_s=600), HANG_GUARD_S)
        assert await watcher.next_status() == NOT_SERVING
        assert await asyncio.wait_for(watcher.call.read(), HANG_GUARD_S) is grpc.aio.EOF


# -- python -m llm_stream.healthcheck (the image's HEALTHCHECK) ---------------------


@pytest.mark.parametrize(
    ("environ", "address"),
    [
        ({}, "localhost:50051"),
        ({"LLM_STREAM_PORT": "6000"}, "localhost:6000"),
        ({"LLM_STREAM_PORT": "6000", "LLM_STREAM_HEALTH_PORT": "0"}, "localhost:6000"),
        ({"LLM_STREAM_PORT": "6000", "LLM_STREAM_HEALTH_PORT": "6001"}, "localhost:6001"),
        (
            {"LLM_STREAM_HEALTH_PORT": "6001", "LLM_STREAM_HEALTHCHECK_ADDRESS": "10.0.0.5:7000"},
            "10.0.0.5:7000",
        ),
    ],
)
def test_healthcheck_address_follows_the_server_variables(
    environ: dict[str, str], address: str
) -> None:
    assert healthcheck.build_parser(environ).parse_args([]).address == address


async def run_healthcheck(environ: dict[str, str]) -> tuple[int, str]:
    """``python -m llm_stream.healthcheck`` as the image's HEALTHCHECK runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_STREAM_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_stream.healthcheck",
        "--timeout",
        "4",
        env=env | environ,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), HANG_GUARD_S)
    assert process.returncode is not None
    return process.returncode, stderr.decode(errors="replace")


async def test_healthcheck_uses_the_plaintext_health_port_when_the_grpc_port_speaks_tls(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    served = CertificateAuthority(tmp_path / "ca").issue_server()
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        tls_cert=served.cert,
        tls_key=served.key,
        health_port=free_port(),
    )
    async with running_server(settings) as running:
        port, health_port = running.server.port, running.server.health_port
        server_env = {"LLM_STREAM_PORT": str(port), "LLM_STREAM_HEALTH_PORT": str(health_port)}
        code, stderr = await run_healthcheck(server_env)
        assert code == 0, stderr

        # The TLS port does not answer a plaintext check: that is what the health port is for.
        code, stderr = await run_healthcheck({"LLM_STREAM_PORT": str(port)})
        assert code == 1
        assert f"localhost:{port}" in stderr and "UNAVAILABLE" in stderr, stderr

        await running.server.health.mark_draining()
        code, stderr = await run_healthcheck(server_env)
        assert code == 1
        assert f"localhost:{health_port}" in stderr and "NOT_SERVING" in stderr, stderr
