"""--engine-process on: the model's core in a child process, the same service outside.

The GPU default (``auto``); here on the CPU with the tiny model, through a real
server and a real channel. The child is spawned, so it loads the model itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import (
    RunningServer,
    cancel_after,
    collect_stream,
    health_status,
    prompt_request,
    running_server,
    tiny_settings,
)


@pytest.fixture(scope="module")
async def process_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(
        tiny_model_dir, cache_dir, engine_process="on", max_concurrent=4, max_queue=1
    )
    async with running_server(settings) as running:
        yield running


def child_pid(running: RunningServer) -> int:
    execution = running.server.engine.backend_for("").execution
    match = re.search(r"engine process \(pid (\d+)\)", execution)
    assert match, execution
    return int(match.group(1))


async def test_streams_batches_and_errors_go_through_the_child(
    process_server: RunningServer,
) -> None:
    assert child_pid(process_server) != os.getpid()
    tokens = await collect_stream(process_server.stub, prompt_request("Hello 🎉", max_tokens=12))
    assert tokens[-1].is_final and tokens[-1].usage.completion_tokens == 12
    text = "".join(t.token for t in tokens[:-1])
    reply = await process_server.stub.Predict(prompt_request("Hello 🎉", max_tokens=12))
    assert reply.text == text  # greedy: the same text, streamed or not
    batch = await process_server.stub.BatchPredict(
        pb.BatchPredictRequest(
            requests=[
                prompt_request("one", max_tokens=3),
                prompt_request("x" * 20000, max_tokens=3),  # longer than the context
                prompt_request("two", max_tokens=4),
            ]
        )
    )
    outcomes = [r.WhichOneof("outcome") for r in batch.results]
    assert outcomes == ["response", "error", "response"]
    assert "context" in batch.results[1].error.message
    assert [batch.results[i].response.usage.completion_tokens for i in (0, 2)] == [3, 4]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await process_server.stub.Predict(prompt_request("x" * 20000, max_tokens=3))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cancel_reaches_the_child_within_a_step(process_server: RunningServer) -> None:
    record = await cancel_after(process_server, "process-cancel", 5)
    assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
    assert record.completion_tokens < 3000


async def test_a_full_batch_refuses_at_once(process_server: RunningServer) -> None:
    holders = [
        process_server.stub.StreamPredict(prompt_request("hold", max_tokens=3000))
        for _ in range(4)  # the 4 rows
    ]
    for holder in holders:
        await holder.read()
    holders.append(process_server.stub.StreamPredict(prompt_request("queued", max_tokens=3)))
    engine = process_server.server.engine
    for _ in range(100):  # the counts come with the child's steps
        if engine.waiting == 1:
            break
        await asyncio.sleep(0.02)
    assert engine.active == 4 and engine.waiting == 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await process_server.stub.Predict(prompt_request("one more", max_tokens=2))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    for holder in holders:
        holder.cancel()
    for _ in range(100):
        if engine.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.in_flight == 0


async def test_a_dead_engine_process_ends_its_streams_retryably(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, engine_process="on")
    async with running_server(settings) as running:
        stream = running.stub.StreamPredict(prompt_request("Hello world", max_tokens=3000))
        await stream.read()
        os.kill(child_pid(running), signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await asyncio.wait_for(stream.read(), 30) is not grpc.aio.EOF:
                pass
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(running.server.failed.wait(), 10)
        assert await health_status(running, "") != 1  # not SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.stub.Predict(prompt_request("after", max_tokens=2))
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_model_the_child_cannot_load_fails_the_start_clearly(
    tmp_path: Path, cache_dir: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    settings = tiny_settings(broken, cache_dir, engine_process="on")
    async with running_server(settings, wait_ready=False) as running:
        assert running.server.ready is not None
        with pytest.raises(Exception, match="cannot load model") as raised:
            await asyncio.wait_for(asyncio.shield(running.server.ready), 120)
        assert "broken" in str(raised.value)
