"""Continuous batching through a real server: shared steps, slow readers, the token budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llm_stream.engine.types import FinishReason
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import (
    THROTTLED_CHANNEL,
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.wrapped_backend import slow_models


@pytest.fixture
async def paced_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """Decode steps of 20 ms, so that concurrent requests overlap for sure."""
    settings = tiny_settings(tiny_model_dir, cache_dir, max_batch_tokens=2000)
    async with running_server(settings, load_models=slow_models(0.02)) as running:
        yield running


async def test_concurrent_streams_share_decode_steps(paced_server: RunningServer) -> None:
    tokens, streams = 20, 8
    before = paced_server.server.engine.steps
    requests = [prompt_request(f"Hello {i}", max_tokens=tokens) for i in range(streams)]
    results = await asyncio.gather(*(collect_stream(paced_server.stub, r) for r in requests))
    assert all(r[-1].usage.completion_tokens == tokens for r in results)
    # One at a time would take streams x tokens steps; together they take about tokens.
    assert paced_server.server.engine.steps - before < 2 * tokens


async def test_a_slow_reader_never_holds_the_batch(paced_server: RunningServer) -> None:
    slow_channel = grpc.aio.insecure_channel(paced_server.target, options=THROTTLED_CHANNEL)
    try:
        request = prompt_request("Hello world", max_tokens=150)
        request.request_id = "slow-reader"
        slow = pb_grpc.InferenceServiceStub(slow_channel).StreamPredict(request)
        await slow.read()
        # The others stream on while the slow client reads nothing more.
        quick = await collect_stream(paced_server.stub, prompt_request("Hi", max_tokens=30))
        assert quick[-1].usage.completion_tokens == 30
        # Its own generation is not held back either: the row finishes unread ...
        record = await paced_server.server.engine.wait_finished("slow-reader", 30)
        assert record.finish_reason is FinishReason.LENGTH
        assert record.completion_tokens == 150
        # ... and the client still gets every token when it reads at last.
        rest = []
        while (token := await slow.read()) is not grpc.aio.EOF:
            rest.append(token)
        assert rest[-1].is_final and rest[-1].usage.completion_tokens == 150
        assert len(rest) == 150  # 149 more tokens and the final message
    finally:
        await slow_channel.close()


async def test_request_beyond_the_batch_budget_is_invalid(paced_server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await paced_server.stub.Predict(prompt_request("Hello", max_tokens=2500))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-batch-tokens" in (raised.value.details() or "")


async def test_batch_item_beyond_the_budget_is_its_own_error(paced_server: RunningServer) -> None:
    response = await paced_server.stub.BatchPredict(
        pb.BatchPredictRequest(
            requests=[
                prompt_request("Hello", max_tokens=4),
                prompt_request("Hello", max_tokens=2500),
                prompt_request("Hi", max_tokens=4),
            ]
        )
    )
    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["response", "error", "response"]
    assert response.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "--max-batch-tokens" in response.results[1].error.message
