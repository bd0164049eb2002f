"""Cancel, disconnect and deadline stop the model itself, not only the yields.

Each test reads the engine's record of the finished worker: it ends with reason
CANCELLED after far fewer tokens than max_tokens, and its slot is free again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from llm_stream.engine.engine import FinishedGeneration
from llm_stream.engine.types import FinishReason
from tests.conftest import RunningServer, prompt_request, running_server, tiny_settings
from tests.wrapped_backend import slow_models

MAX_TOKENS = 3500


@pytest.fixture
async def one_slot_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """One batch row, and a model slow enough that a long generation is still running."""
    settings = tiny_settings(tiny_model_dir, cache_dir, max_concurrent=1)
    async with running_server(settings, load_models=slow_models(0.005)) as running:
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
    # A slow reader never slows the batch, so the row decodes until the deadline
    # cancels it: "stopped at the deadline", far short of max_tokens.
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


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the server reaches on its own (a hang guard, not a timing check)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - server state has no event to await
            await asyncio.sleep(0.01)


async def test_request_cancelled_while_queued_leaves_the_queue(
    one_slot_server: RunningServer,
) -> None:
    engine = one_slot_server.server.engine
    holder_request = prompt_request("hold", max_tokens=MAX_TOKENS)
    holder_request.request_id = "holder"
    holder = one_slot_server.stub.StreamPredict(holder_request)
    await holder.read()
    queued_request = prompt_request("queued", max_tokens=3)
    queued_request.request_id = "queued"
    queued = one_slot_server.stub.Predict(queued_request)
    await eventually(lambda: engine.waiting == 1)
    queued.cancel()
    await eventually(lambda: engine.waiting == 0)
    holder.cancel()
    assert_stopped_early(await finished(one_slot_server, "holder"), MAX_TOKENS // 2)
    await assert_model_free(one_slot_server)
    # It never reached the model: recorded as cancelled, with no token.
    record = await finished(one_slot_server, "queued")
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens == 0 and record.first_token_s is None


async def test_cancelled_row_leaves_within_one_step_and_others_go_on(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """One of several running streams is cancelled: its row is gone by the next step."""
    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with running_server(settings, load_models=slow_models(0.02)) as running:
        calls = {}
        for name in ("keep-1", "victim", "keep-2"):
            request = prompt_request("Hello world", max_tokens=40)
            request.request_id = name
            calls[name] = running.stub.StreamPredict(request)
        for call in calls.values():
            await call.read()
        calls["victim"].cancel()
        record = await finished(running, "victim")
        assert record.finish_reason is FinishReason.CANCELLED
        assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
        for name in ("keep-1", "keep-2"):
            tokens = []
            while (token := await calls[name].read()) is not grpc.aio.EOF:
                tokens.append(token)
            assert tokens[-1].is_final
            kept = await finished(running, name)
            assert kept.finish_reason is not FinishReason.CANCELLED
            assert kept.completion_tokens == tokens[-1].usage.completion_tokens
        assert record.completion_tokens < 40
