"""Shared fixtures: a tiny model folder, and real servers on ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_stream.app import LLMStreamServer, load_configured_models
from llm_stream.engine.engine import FinishedGeneration
from llm_stream.engine.types import ModelBackend
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.settings import Settings
from tests.tiny_model import build_tiny_model

# A client that does not read: without BDP probing its receive window stays tiny, so
# HTTP/2 flow control soon stops the server's messages to it.
THROTTLED_CHANNEL = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_settings(tiny_model_dir: Path, cache_dir: Path, **overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1",
        port=0,
        models=(f"tiny={tiny_model_dir}",),
        cache_dir=cache_dir,
        max_tokens_cap=4000,
        default_max_tokens=16,
        drain_grace_s=5.0,
        # No HTTP unless a test asks for it (with a free_port()): 8000 may be taken.
        http_port=0,
    )
    return dataclasses.replace(base, **overrides)


@dataclasses.dataclass
class RunningServer:
    server: LLMStreamServer
    channel: grpc.aio.Channel
    stub: pb_grpc.InferenceServiceStub
    health: health_pb2_grpc.HealthStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """The HTTP API's base URL (the server needs an ``http_port``)."""
        assert self.server.http_port, "start the server with http_port=free_port()"
        return f"http://127.0.0.1:{self.server.http_port}"


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings,
    *,
    wait_ready: bool = True,
    load_models: Callable[[Settings], Sequence[ModelBackend]] = load_configured_models,
    channel_options: Sequence[tuple[str, Any]] = (),
    compression: grpc.Compression | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> AsyncIterator[RunningServer]:
    """A real server on an ephemeral port, with a real channel to it (TLS with
    ``credentials``)."""
    server = LLMStreamServer(settings, load_models=load_models)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    if credentials is None:
        channel = grpc.aio.insecure_channel(
            target, options=list(channel_options), compression=compression
        )
    else:
        channel = grpc.aio.secure_channel(
            target, credentials, options=list(channel_options), compression=compression
        )
    try:
        if wait_ready:
            assert server.ready is not None
            await asyncio.wait_for(asyncio.shield(server.ready), 120)
        yield RunningServer(
            server,
            channel,
            pb_grpc.InferenceServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )
    finally:
        await channel.close()
        await server.drain(grace_s=0)


@pytest.fixture(scope="session")
async def tiny_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """One shared server on the tiny model for tests that do not change its state."""
    async with running_server(tiny_settings(tiny_model_dir, cache_dir, max_concurrent=8)) as s:
        yield s


def prompt_request(prompt: str | None = "Hello world", **config: Any) -> pb.PredictRequest:
    request = pb.PredictRequest(config=pb.InferenceConfig(**config))
    if prompt is not None:
        request.features["prompt"].string_value = prompt
    return request


async def health_status(running: RunningServer, service: str) -> int:
    response = await running.health.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


def free_port() -> int:
    """A port free right now, for processes that need one named up front."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def cancel_after(running: RunningServer, request_id: str, tokens: int) -> FinishedGeneration:
    """Stream a long generation, cancel it after ``tokens`` tokens; its record once freed."""
    request = prompt_request("Hello world", max_tokens=3000)
    request.request_id = request_id
    stream = running.stub.StreamPredict(request)
    async for token in stream:
        if token.token_index == tokens:
            break
    stream.cancel()
    return await running.server.engine.wait_finished(request_id, 30)


async def collect_stream(
    stub: pb_grpc.InferenceServiceStub, request: pb.PredictRequest, **kwargs: Any
) -> list[pb.PredictToken]:
    return [token async for token in stub.StreamPredict(request, **kwargs)]
