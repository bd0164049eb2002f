"""Client-side balancing: one InferenceClient spreads requests over replicas."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_stream.client import InferenceClient
from tests.conftest import RunningServer, running_server, tiny_settings


@pytest.fixture(scope="module")
async def two_replicas(
    tiny_model_dir: Path, cache_dir: Path
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            running_server(tiny_settings(tiny_model_dir, cache_dir))
        )
        second = await stack.enter_async_context(
            running_server(tiny_settings(tiny_model_dir, cache_dir))
        )
        yield first, second


def served(replica: RunningServer, prefix: str) -> int:
    return sum(r.request_id.startswith(prefix) for r in replica.server.engine.finished)


async def test_round_robin_over_several_targets(
    two_replicas: tuple[RunningServer, RunningServer],
) -> None:
    first, second = two_replicas
    async with InferenceClient([first.target, second.target]) as client:
        assert client.target.startswith("ipv4:")
        await client.wait_ready(timeout=30)
        for i in range(10):
            await client.predict("Hello", max_tokens=2, request_id=f"rr-unary-{i}")
        for i in range(10):
            async for _ in client.stream("Hello", max_tokens=2, request_id=f"rr-stream-{i}"):
                pass
    for prefix in ("rr-unary-", "rr-stream-"):
        counts = served(first, prefix), served(second, prefix)
        assert sum(counts) == 10
        assert min(counts) >= 3, counts  # round_robin alternates; both replicas work


async def test_dns_name_target_connects(
    two_replicas: tuple[RunningServer, RunningServer],
) -> None:
    first, _ = two_replicas
    async with InferenceClient(f"dns:///localhost:{first.server.port}") as client:
        await client.wait_ready(timeout=30)
        response = await client.predict("Hello", max_tokens=2)
    assert response.usage.completion_tokens > 0


async def test_client_survives_one_replica_going_away(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        keeper, leaver = [
            await stack.enter_async_context(
                running_server(tiny_settings(tiny_model_dir, cache_dir))
            )
            for _ in range(2)
        ]
        client = await stack.enter_async_context(InferenceClient([keeper.target, leaver.target]))
        await client.wait_ready(timeout=30)
        await client.predict("Hello", max_tokens=2)
        await leaver.server.drain(grace_s=0)
        for i in range(6):
            response = await client.predict("Hello", max_tokens=2, request_id=f"left-{i}")
            assert response.usage.completion_tokens > 0
        assert served(keeper, "left-") == 6
