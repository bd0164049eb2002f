"""Transport options: gzip, message limits, many streams, reflection, keepalive."""

from __future__ import annotations

import array
import asyncio
import dataclasses
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.protocol.server import server_options
from tests.conftest import (
    THROTTLED_CHANNEL,
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)

HANG_GUARD_S = 60


def stream_text(tokens: list[pb.PredictToken]) -> str:
    return "".join(t.token for t in tokens if not t.is_final)


# -- compression -------------------------------------------------------------------


class RecordingProxy:
    """A TCP proxy that keeps every byte each way, to read the HTTP/2 frames."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.to_server = bytearray()
        self.to_client = bytearray()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RecordingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def target(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        for src, dst, log in (
            (reader, up_writer, self.to_server),
            (up_reader, writer, self.to_client),
        ):
            task = asyncio.create_task(self._pipe(src, dst, log))
            self._pipes.add(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, log: bytearray) -> None:
        try:
            while data := await src.read(65536):
                log.extend(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()


def grpc_message_flags(raw: bytes, from_client: bool) -> list[int]:
    """The compressed flag of every gRPC message in an HTTP/2 byte stream."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if from_client:
        assert raw.startswith(preface)
        raw = raw[len(preface) :]
    data: dict[int, bytearray] = {}
    offset = 0
    while offset + 9 <= len(raw):
        length = int.from_bytes(raw[offset : offset + 3], "big")
        kind, flags = raw[offset + 3], raw[offset + 4]
        stream = int.from_bytes(raw[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
        payload = raw[offset + 9 : offset + 9 + length]
        offset += 9 + length
        if kind == 0:  # DATA
            if flags & 0x8:  # PADDED
                payload = payload[1 : len(payload) - payload[0]]
            data.setdefault(stream, bytearray()).extend(payload)
    found = []
    for body in data.values():
        at = 0
        while at + 5 <= len(body):
            compressed, size = struct.unpack(">BI", body[at : at + 5])
            found.append(compressed)
            at += 5 + size
    return found


def repetitive_batch() -> pb.BatchPredictRequest:
    """A request and an answer that gzip shrinks a lot (so gRPC does compress them)."""
    request = prompt_request("Hello world " * 100, max_tokens=20)
    return pb.BatchPredictRequest(requests=[request] * 8)


async def exercise_every_rpc(channel: grpc.aio.Channel) -> pb.BatchPredictResponse:
    stub = pb_grpc.InferenceServiceStub(channel)
    request = prompt_request("Hello world", max_tokens=12)
    unary = await stub.Predict(request, timeout=HANG_GUARD_S)
    tokens = await collect_stream(stub, request, timeout=HANG_GUARD_S)
    assert stream_text(tokens) == unary.text and tokens[-1].is_final
    batch = await stub.BatchPredict(repetitive_batch(), timeout=HANG_GUARD_S)
    assert len(batch.results) == 8
    assert all(r.WhichOneof("outcome") == "response" for r in batch.results)
    check = await stub.Check(pb.HealthCheckRequest(service="InferenceService"))
    assert check.status == pb.HealthCheckResponse.SERVING
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    return batch


@dataclasses.dataclass
class Wire:
    request_flags: list[int]
    response_flags: list[int]
    batch: pb.BatchPredictResponse


async def over_the_wire(running: RunningServer, compression: grpc.Compression | None) -> Wire:
    async with RecordingProxy(running.server.port) as proxy:
        channel = grpc.aio.insecure_channel(proxy.target, compression=compression)
        try:
            batch = await exercise_every_rpc(channel)
        finally:
            await channel.close()
    return Wire(
        grpc_message_flags(bytes(proxy.to_server), from_client=True),
        grpc_message_flags(bytes(proxy.to_client), from_client=False),
        batch,
    )


def texts(batch: pb.BatchPredictResponse) -> list[str]:
    return [r.response.text for r in batch.results]


async def test_gzip_by_default_and_client_compression_honoured(
    tiny_server: RunningServer, tiny_model_dir: Path, cache_dir: Path
) -> None:
    plain = await over_the_wire(tiny_server, None)
    assert 1 in plain.response_flags  # the server gzips its answers unasked
    assert set(plain.request_flags) == {0}

    gzipped = await over_the_wire(tiny_server, grpc.Compression.Gzip)
    assert 1 in gzipped.request_flags  # the server reads gzip requests
    assert 1 in gzipped.response_flags
    assert texts(gzipped.batch) == texts(plain.batch)

    settings = tiny_settings(tiny_model_dir, cache_dir, compression="none")
    async with running_server(settings) as uncompressed:
        off = await over_the_wire(uncompressed, None)
        assert set(off.response_flags) == {0}  # what the flag check sees without gzip
        honoured = await over_the_wire(uncompressed, grpc.Compression.Gzip)
        assert 1 in honoured.request_flags
    assert texts(off.batch) == texts(plain.batch)


# -- message size ------------------------------------------------------------------


def request_with_floats(megabytes: int) -> pb.PredictRequest:
    request = prompt_request("Hello world", max_tokens=4)
    zeros = array.array("f", bytes(megabytes * 1024 * 1024))
    request.features["embedding"].float_array.values.extend(zeros)
    return request


async def test_large_message_is_served(tiny_server: RunningServer) -> None:
    request = request_with_floats(30)
    assert request.ByteSize() > 30 * 1024 * 1024
    response = await tiny_server.stub.Predict(request, timeout=HANG_GUARD_S)
    small = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=4))
    assert response.text == small.text  # the extra feature is carried and ignored
    tokens = await collect_stream(tiny_server.stub, request, timeout=HANG_GUARD_S)
    assert stream_text(tokens) == small.text


async def test_message_over_the_configured_limit(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, max_message_bytes=1024 * 1024)
    async with running_server(settings) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.Predict(request_with_floats(2), timeout=HANG_GUARD_S)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (raised.value.details() or "")
        response = await running.stub.Predict(prompt_request("Hello", max_tokens=3))
        assert response.usage.completion_tokens > 0


# -- many concurrent streams ---------------------------------------------------------


async def test_many_concurrent_streams(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, max_concurrent=4, max_queue=32)
    words = ["Hello", "world", "quick", "brown", "fox", "lazy", "dog", "Bonjour"]
    prompts = [f"{words[i % 8]} {words[(i * 3) % 8]} {i}" for i in range(24)]
    async with running_server(settings) as running:
        requests = []
        for i, prompt in enumerate(prompts):
            request = prompt_request(prompt, max_tokens=15 + i % 10)
            request.request_id = f"concurrent-{i}"
            requests.append(request)
        streams = await asyncio.wait_for(
            asyncio.gather(*(collect_stream(running.stub, r) for r in requests)), HANG_GUARD_S
        )
        for request, tokens in zip(requests, streams, strict=True):
            *body, final = tokens
            assert final.is_final
            assert final.token_index == len(body) == final.usage.completion_tokens
            assert [t.token_index for t in body] == list(range(len(body)))
            assert len(body) <= request.config.max_tokens
            unary = await running.stub.Predict(request)
            assert stream_text(tokens) == unary.text
        assert len({stream_text(tokens) for tokens in streams}) > 1
        finished = {f.request_id for f in running.server.engine.finished}
        assert {r.request_id for r in requests} <= finished


# -- reflection ------------------------------------------------------------------------


async def reflect(
    channel: grpc.aio.Channel, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter(requests), timeout=HANG_GUARD_S)
    return [response async for response in call]


async def test_reflection_lists_and_describes_the_services(tiny_server: RunningServer) -> None:
    listing, described = await reflect(
        tiny_server.channel,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.v1.InferenceService"
        ),
    )
    names = {s.name for s in listing.list_services_response.service}
    assert {"inference.v1.InferenceService", "grpc.health.v1.Health"} <= names
    # grpcurl needs the descriptors, not only the names.
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    service = next(s for f in files if f.package == "inference.v1" for s in f.service)
    assert {m.name for m in service.method} == {"Predict", "StreamPredict", "BatchPredict", "Check"}


async def test_reflection_can_be_turned_off(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, reflection=False)
    async with running_server(settings) as running:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await reflect(running.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


# -- keepalive -------------------------------------------------------------------------

# A client that pings every second, also between data frames: far more often
# than the server's minimum interval. A server with grpc's default of 2 ping
# strikes answers GOAWAY too_many_pings after about four such pings.
EAGER_PINGS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


@pytest.fixture
async def eager_ping_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(tiny_model_dir, cache_dir)
    options = THROTTLED_CHANNEL + EAGER_PINGS
    async with running_server(settings, channel_options=options) as running:
        yield running


async def test_eager_pinging_client_is_not_sent_goaway(eager_ping_server: RunningServer) -> None:
    stream = eager_ping_server.stub.StreamPredict(prompt_request("Hello world", max_tokens=500))
    assert (await stream.read()).token_index == 0
    # A slow reader: the server sends nothing for a while, the client keeps pinging.
    await asyncio.sleep(6)
    rest = []
    while (token := await asyncio.wait_for(stream.read(), HANG_GUARD_S)) is not grpc.aio.EOF:
        rest.append(token)
    assert rest[-1].is_final and rest[-1].usage.completion_tokens == 500
    response = await eager_ping_server.stub.Predict(prompt_request("again", max_tokens=2))
    assert response.usage.completion_tokens > 0


async def test_ping_strikes_when_enabled_do_send_goaway(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """--max-ping-strikes is live: an operator who enables it gets grpc's enforcement."""
    settings = tiny_settings(tiny_model_dir, cache_dir, max_ping_strikes=1)
    options = THROTTLED_CHANNEL + EAGER_PINGS
    async with running_server(settings, channel_options=options) as running:
        stream = running.stub.StreamPredict(prompt_request("Hello world", max_tokens=500))
        assert (await stream.read()).token_index == 0
        await asyncio.sleep(6)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await asyncio.wait_for(stream.read(), HANG_GUARD_S) is not grpc.aio.EOF:
                pass
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert raised.value.details() == "Too many pings"


def test_connection_age_option_reaches_grpc(tiny_model_dir: Path, cache_dir: Path) -> None:
    off = dict(server_options(tiny_settings(tiny_model_dir, cache_dir)))
    assert "grpc.max_connection_age_ms" not in off
    on = dict(
        server_options(
            tiny_settings(
                tiny_model_dir, cache_dir, max_connection_age_s=600, max_connection_age_grace_s=30
            )
        )
    )
    assert on["grpc.max_connection_age_ms"] == 600_000
    assert on["grpc.max_connection_age_grace_ms"] == 30_000


def test_keepalive_options_reach_grpc(tiny_model_dir: Path, cache_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, min_ping_interval_s=7.5)
    options = dict(server_options(settings))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_ping_strikes"] == 0
    # The name grpc reads (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 7_500
    assert options["grpc.max_receive_message_length"] == 100 * 1024 * 1024
    assert options["grpc.max_send_message_length"] == 100 * 1024 * 1024
