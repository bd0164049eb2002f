"""API keys: Bearer metadata, keys reloaded from their file, ids (never keys) in the
log, the per-key cap, and the retry pushback a refused client is given."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llm_stream.access.api_keys import ApiKeyStore, key_id, parse_keys
from llm_stream.client import InferenceClient
from llm_stream.logging_setup import LOG_FORMAT, RequestContextFilter
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.protocol.status import RETRY_PUSHBACK_KEY
from tests.conftest import (
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.test_client import run_client
from tests.test_errors import assert_clear, wait_in_flight
from tests.wrapped_backend import slow_models

ALICE = "alice-0f3c9a7e4b1d2c8e"
BOB = "bob-7d2e1f0a9c8b3e4d"
CAROL = "carol-1a2b3c4d5e6f7a8b"
LONG = 2000  # tokens: a stream that holds its row until cancelled


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def write_keys(path: Path, *keys: str) -> None:
    """Replace the file atomically, with a fresh mtime (as a Secret update would)."""
    staging = path.with_suffix(".new")
    staging.write_text("# test keys\n" + "".join(f"{k}  # {k[:3]}\n" for k in keys))
    os.replace(staging, path)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    write_keys(path, ALICE, BOB)
    return path


def test_keys_file_format() -> None:
    text = "# comment\n\n  key-one  \nkey-two # trailing comment\n#key-three\nkey-one\nk#4\n"
    # A "#" inside a key is part of it: cutting there would accept a shorter key.
    assert parse_keys(text) == ["key-one", "key-two", "key-one", "k#4"]
    assert key_id("key-one") == key_id("key-one") != key_id("key-two")
    assert "key-one" not in key_id("key-one") and len(key_id("key-one")) == 12


def test_identify_needs_the_bearer_scheme_and_an_exact_key(keys_file: Path) -> None:
    store = ApiKeyStore(keys_file)
    assert store.identify(f"Bearer {ALICE}") == key_id(ALICE)
    assert store.identify(f"bearer {BOB}") == key_id(BOB)
    for wrong in (None, ALICE, f"Basic {ALICE}", f"Bearer {ALICE}x", f"Bearer {ALICE[:-1]}", ""):
        assert store.identify(wrong) is None


async def test_calls_need_a_valid_key_but_health_and_reflection_do_not(
    tiny_model_dir: Path, cache_dir: Path, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, api_keys_file=keys_file)
    caplog.set_level(logging.DEBUG)
    # The server's own log format: each line carries the request id and key id.
    caplog.handler.addFilter(RequestContextFilter())
    caplog.handler.setFormatter(logging.Formatter(LOG_FORMAT))
    async with running_server(settings) as running:
        stub = running.stub
        request = prompt_request("Hello", max_tokens=3)
        for metadata, fragment in (
            ((), "needs an API key"),
            (bearer("not-a-key"), "not valid"),
            ((("authorization", ALICE),), "not valid"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Predict(request, metadata=metadata, timeout=10)
            assert_clear(raised.value, grpc.StatusCode.UNAUTHENTICATED, fragment)
            assert "authorization: Bearer <key>" in (raised.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await collect_stream(stub, request, metadata=metadata, timeout=10)
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.BatchPredict(
                    pb.BatchPredictRequest(requests=[request]), metadata=metadata, timeout=10
                )
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED

        assert (await stub.Predict(request, metadata=bearer(ALICE), timeout=30)).text
        tokens = await collect_stream(stub, request, metadata=bearer(BOB), timeout=30)
        assert tokens[-1].is_final
        check = await stub.Check(pb.HealthCheckRequest(), metadata=bearer(BOB), timeout=10)
        assert check.status == pb.HealthCheckResponse.SERVING

        # Probes and tools need no key.
        health = await running.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(running.channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in replies for s in r.list_services_response.service]
        assert "inference.v1.InferenceService" in services

    # The log names keys by id and never holds a key.
    assert key_id(ALICE) in caplog.text and key_id(BOB) in caplog.text
    for key in (ALICE, BOB, "not-a-key"):
        assert key not in caplog.text


async def test_keys_are_added_and_revoked_without_a_restart(
    tiny_model_dir: Path, cache_dir: Path, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, api_keys_file=keys_file)
    request = prompt_request("Hello", max_tokens=2)
    async with running_server(settings) as running:
        stub = running.stub

        async def code_for(key: str) -> grpc.StatusCode:
            try:
                await stub.Predict(request, metadata=bearer(key), timeout=30)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        assert await code_for(CAROL) is grpc.StatusCode.UNAUTHENTICATED
        with caplog.at_level(logging.INFO, logger="llm_stream.access.api_keys"):
            write_keys(keys_file, BOB, CAROL)  # Carol added, Alice revoked

            async def reloaded() -> None:
                # The server looks at the file at most once a second; nothing to await.
                while await code_for(CAROL) is not grpc.StatusCode.OK:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(reloaded(), 10)
        assert await code_for(ALICE) is grpc.StatusCode.UNAUTHENTICATED
        assert await code_for(BOB) is grpc.StatusCode.OK
        assert f"added: {key_id(CAROL)}" in caplog.text
        assert f"removed: {key_id(ALICE)}" in caplog.text

        # A file that vanishes mid-update keeps the last keys rather than locking out.
        keys_file.unlink()  # noqa: ASYNC240
        await asyncio.sleep(1.2)
        assert await code_for(BOB) is grpc.StatusCode.OK


async def hold_streams(running: RunningServer, key: str, count: int) -> list[grpc.aio.Call]:
    calls = []
    for index in range(count):
        call = running.stub.StreamPredict(
            prompt_request(f"hold {index}", max_tokens=LONG), metadata=bearer(key)
        )
        await call.read()  # its first token: it holds a row
        calls.append(call)
    return calls


async def test_one_key_cannot_take_every_slot(
    tiny_model_dir: Path, cache_dir: Path, keys_file: Path
) -> None:
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        api_keys_file=keys_file,
        max_concurrent=4,
        max_concurrent_per_key=2,
        retry_pushback_s=0.25,
        max_tokens_cap=LONG,
    )
    async with running_server(settings, load_models=slow_models(0.01)) as running:
        held = await hold_streams(running, ALICE, 2)
        assert running.server.access.held_by(key_id(ALICE)) == 2

        # Alice's third generation is refused, with the pushback a client retries after ...
        call = running.stub.Predict(prompt_request("third", max_tokens=2), metadata=bearer(ALICE))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert_clear(raised.value, grpc.StatusCode.RESOURCE_EXHAUSTED, key_id(ALICE), "2 of its 2")
        assert ALICE not in (raised.value.details() or "")
        trailers = dict(raised.value.trailing_metadata() or ())
        assert 125 <= int(trailers[RETRY_PUSHBACK_KEY]) <= 375  # 250 ms, jittered
        # ... and a batch larger than her cap can never run: split it.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.BatchPredict(
                pb.BatchPredictRequest(requests=[prompt_request("b", max_tokens=2)] * 3),
                metadata=bearer(BOB),
            )
        assert_clear(raised.value, grpc.StatusCode.INVALID_ARGUMENT, "split")

        # Bob is still served while Alice is at her cap.
        response = await running.stub.Predict(
            prompt_request("bob", max_tokens=2), metadata=bearer(BOB), timeout=30
        )
        assert response.usage.completion_tokens > 0

        # When one of Alice's streams ends, she may start another.
        held[0].cancel()
        await wait_in_flight(running, 1)
        assert running.server.access.held_by(key_id(ALICE)) == 1
        response = await running.stub.Predict(
            prompt_request("again", max_tokens=2), metadata=bearer(ALICE), timeout=30
        )
        assert response.usage.completion_tokens > 0
        held[1].cancel()
        await wait_in_flight(running, 0)
        assert running.server.access.held_by(key_id(ALICE)) == 0


async def test_the_client_absorbs_a_burst_by_retrying_after_the_pushback(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    """One row, no queue: of four calls sent together all but one are refused at first,
    and the client's retries, after the server's pushback, still complete them all."""
    settings = tiny_settings(
        tiny_model_dir, cache_dir, max_concurrent=1, max_queue=0, retry_pushback_s=1.0
    )
    async with running_server(settings, load_models=slow_models(0.02)) as running:
        async with InferenceClient(f"127.0.0.1:{running.server.port}") as client:

            async def stream() -> list[pb.PredictToken]:
                return [t async for t in client.stream("stream too", max_tokens=4, timeout=120)]

            started = time.monotonic()
            results = await asyncio.gather(
                *(client.predict(f"burst {i}", max_tokens=4, timeout=120) for i in range(3)),
                stream(),
            )
            elapsed = time.monotonic() - started
        *responses, streamed = results
        assert all(r.usage.completion_tokens > 0 for r in responses)
        assert streamed[-1].is_final
        rejected = running.server.metrics.registry.get_sample_value(
            "llm_stream_rejected_requests_total", {"code": "RESOURCE_EXHAUSTED"}
        )
        assert rejected is not None and rejected >= 3
        # Retries waited the server's pushback (1 s, jittered to at least 0.5 s), not
        # the client's own 0.2 s first backoff.
        assert elapsed >= 0.5


async def test_cli_sends_the_api_key_from_the_environment(
    tiny_model_dir: Path, cache_dir: Path, keys_file: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, api_keys_file=keys_file)
    async with running_server(settings) as running:
        args = ("--target", running.target, "--max-tokens", "3", "--raw", "Hello")
        code, _, err = await run_client(*args, env={"LLM_STREAM_API_KEY": ALICE})
        assert code == 0, err
        code, _, err = await run_client(*args)
        assert code == 1 and "UNAUTHENTICATED" in err and "--api-key" in err
        assert "Traceback" not in err
