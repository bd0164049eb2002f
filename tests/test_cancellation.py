"""Cancel, disconnect and deadline stop the model itself, not only the yields.

Each test reads the engine's record of the finished worker: it ends with reason
CANCELLED after far fewer tokens than max_tokens, and its slot is free again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llm_stream.engine.engine import FinishedGeneration
from llm_stream.engine.types import (
    FinishReason,
    GenerationRequest,
    SamplingParams,
    StopSignal,
    TokenEvent,
)
from llm_stream.model.loader import load_backend
from llm_stream.model.sources import parse_model_spec
from tests.conftest import RunningServer, prompt_request, running_server, tiny_settings

MAX_TOKENS = 3500


@pytest.fixture
async def one_slot_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """One generation at a time and a tiny stream buffer, so a lagging reader throttles."""
    settings = tiny_settings(tiny_model_dir, cache_dir, max_concurrent=1, stream_buffer=2)
    async with running_server(settings) as running:
        yield running


async def finished(running: RunningServer, request_id: str) -> FinishedGeneration:
    return await running.server.engine.wait_finished(request_id, timeout=30)


def assert_stopped_early(record: FinishedGeneration, most: int = 100) -> None:
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens < most < MAX_TOKENS


async def assert_model_free(running: RunningServer) -> None:
    response = await running.stub.Predict(prompt_request("again", max_tokens=3), timeout=30)
    assert response.usage.completion_tokens > 0


async def test_client_cancel_stops_generation(one_slot_server: RunningServer) -> None:
    request = prompt_request("Hello world", max_tokens=MAX_TOKENS)
    request.request_id = "cancel-me"
    call = one_slot_server.stub.StreamPredict(request)
    for _ in range(3):
        await call.read()
    call.cancel()
    assert_stopped_early(await finished(one_slot_server, "cancel-me"))
    await assert_model_free(one_slot_server)


async def test_dropped_connection_stops_generation(one_slot_server: RunningServer) -> None:
    channel = grpc.aio.insecure_channel(one_slot_server.target)
    request = prompt_request("Hello world", max_tokens=MAX_TOKENS)
    request.request_id = "dropped"
    call = channel.unary_stream(
        "/inference.v1.InferenceService/StreamPredict",
        request_serializer=type(request).SerializeToString,
    )(request)
    await call.read()
    await channel.close(grace=None)  # the connection goes away mid-stream
    assert_stopped_early(await finished(one_slot_server, "dropped"))
    await assert_model_free(one_slot_server)


async def test_stream_deadline_stops_generation(one_slot_server: RunningServer) -> None:
    request = prompt_request("Hello world", max_tokens=MAX_TOKENS)
    request.request_id = "stream-deadline"
    call = one_slot_server.stub.StreamPredict(request, timeout=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            await asyncio.sleep(0.05)  # a slow reader
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # HTTP/2 flow control lets the model run ahead of a slow reader by a window of
    # messages, so the bound is "stopped at the deadline", far short of max_tokens.
    assert_stopped_early(await finished(one_slot_server, "stream-deadline"), MAX_TOKENS // 2)
    await assert_model_free(one_slot_server)


async def test_unary_deadline_stops_generation(one_slot_server: RunningServer) -> None:
    request = prompt_request("Hello world", max_tokens=MAX_TOKENS)
    request.request_id = "unary-deadline"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await one_slot_server.stub.Predict(request, timeout=0.05)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    record = await finished(one_slot_server, "unary-deadline")
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens < MAX_TOKENS
    await assert_model_free(one_slot_server)


async def test_waiting_request_cancelled_in_queue_frees_its_place(
    one_slot_server: RunningServer,
) -> None:
    holder = one_slot_server.stub.StreamPredict(prompt_request("hold", max_tokens=MAX_TOKENS))
    await holder.read()
    queued = one_slot_server.stub.Predict(prompt_request("queued", max_tokens=3))
    await asyncio.sleep(0.2)  # let it reach the wait queue
    queued.cancel()
    holder.cancel()
    await assert_model_free(one_slot_server)
    engine = one_slot_server.server.engine
    assert engine.in_flight == 0


def test_backend_stops_within_one_decode_step(tiny_model_dir: Path, cache_dir: Path) -> None:
    """The stop signal is read by generate every step: no token after the stop."""
    backend = load_backend(parse_model_spec(f"tiny={tiny_model_dir}"), "cpu", "auto", cache_dir)
    stop = StopSignal()
    seen: list[TokenEvent] = []
    stop_after = 5

    def emit(event: TokenEvent) -> bool:
        seen.append(event)
        if len(seen) == stop_after:
            threading.Thread(target=stop.set).start()  # another thread, like a cancel
            return False
        return True

    request = GenerationRequest(
        "direct", "tiny", "Hello world", SamplingParams(max_tokens=MAX_TOKENS)
    )
    end = backend.stream(request, stop, emit)
    assert end.finish_reason is FinishReason.CANCELLED
    assert end.completion_tokens == stop_after
    assert len(seen) == stop_after
