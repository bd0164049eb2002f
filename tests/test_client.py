"""The client class frontends import, and the ``python -m llm_stream.client`` CLI."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import threading
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import grpc
import pytest

from llm_stream.app import load_configured_models
from llm_stream.client import InferenceClient, channel_target, make_request
from llm_stream.engine.types import FinishReason, ModelBackend
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings
from tests.conftest import RunningServer, running_server, tiny_settings

HANG_GUARD_S = 60


async def test_client_round_trip(tiny_server: RunningServer) -> None:
    async with InferenceClient(tiny_server.target) as client:
        await client.wait_ready(timeout=HANG_GUARD_S)
        assert await client.check() == pb.HealthCheckResponse.SERVING
        assert await client.check("") == pb.HealthCheckResponse.SERVING

        response = await client.predict("Hello world", max_tokens=12, request_id="client-1")
        assert response.request_id == "client-1"
        assert response.text and response.usage.completion_tokens <= 12

        tokens = [t async for t in client.stream("Hello world", max_tokens=12)]
        assert tokens[-1].is_final
        assert "".join(t.token for t in tokens[:-1]) == response.text

        batch = await client.batch(
            [
                make_request("Hello world", max_tokens=12, request_id="b-1"),
                make_request("Hello world", max_tokens=12, model_id="missing"),
            ]
        )
        first, second = batch.results
        assert first.response.request_id == "b-1" and first.response.text == response.text
        assert second.error.code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_client_sampling_options_reach_the_server(tiny_server: RunningServer) -> None:
    async with InferenceClient(tiny_server.target) as client:
        options = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 11, "max_tokens": 20}
        first = await client.predict("Hello world", **options)
        again = await client.predict("Hello world", **options)
        other = await client.predict("Hello world", **(options | {"seed": 12}))
        assert first.text == again.text != other.text
        greedy = await client.predict("Hello world", max_tokens=20)
        stop = greedy.text[4:7]
        stopped = await client.predict("Hello world", max_tokens=20, stop=[stop])
        assert stopped.text == greedy.text[: greedy.text.index(stop)]
        assert stopped.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.predict("Hello world", repetition_penalty=-2.0)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_leaving_a_client_stream_early_stops_the_model(tiny_server: RunningServer) -> None:
    async with InferenceClient(tiny_server.target) as client:
        stream = client.stream("Hello world", max_tokens=3500, request_id="client-leaves")
        async with aclosing(stream) as tokens:
            async for token in tokens:
                if token.token_index == 2:
                    break
    record = await tiny_server.server.engine.wait_finished("client-leaves", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.completion_tokens < 3500


async def test_client_balances_over_several_targets(tiny_server: RunningServer) -> None:
    port = tiny_server.server.port
    async with InferenceClient([f"127.0.0.1:{port}", f"localhost:{port}"]) as client:
        assert client.target == f"ipv4:127.0.0.1:{port},127.0.0.1:{port}"
        await client.wait_ready(timeout=HANG_GUARD_S)
        answers = await asyncio.gather(*(client.predict("Hi", max_tokens=3) for _ in range(4)))
        assert len({a.text for a in answers}) == 1


async def test_wait_ready_times_out_without_a_server() -> None:
    async with InferenceClient("127.0.0.1:1") as client:
        with pytest.raises((TimeoutError, grpc.aio.AioRpcError)) as raised:
            await client.wait_ready(timeout=0.5)
    if isinstance(raised.value, grpc.aio.AioRpcError):
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("localhost:50051", "localhost:50051"),
        ("dns:///llm.svc.cluster.local:50051", "dns:///llm.svc.cluster.local:50051"),
        (["10.0.0.1:50051"], "10.0.0.1:50051"),
        ("10.0.0.1:50051, 10.0.0.2:50052", "ipv4:10.0.0.1:50051,10.0.0.2:50052"),
        (["10.0.0.1:1", "localhost:2"], "ipv4:10.0.0.1:1,127.0.0.1:2"),
        ("[::1]:50051,[fe80::2]:50052", "ipv6:[::1]:50051,[fe80::2]:50052"),
    ],
)
def test_channel_target(targets: str | list[str], expected: str) -> None:
    assert channel_target(targets) == expected


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [
        ("", "no target"),
        ([], "no target"),
        ("10.0.0.1:1,10.0.0.2", "host:port"),
        ("10.0.0.1:1,10.0.0.2:http", "host:port"),
        ("10.0.0.1:1,llm.example.com:2", "dns:///"),
        ("10.0.0.1:1,[::1]:2", "must all be IPv4 or all IPv6"),
    ],
)
def test_channel_target_rejects(targets: str | list[str], fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        channel_target(targets)


# -- the CLI ---------------------------------------------------------------------


async def run_client(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m llm_stream.client ARGS``; ``env`` replaces LLM_STREAM_API_KEY and
    adds variables (the caller's own key never leaks in)."""
    base = {k: v for k, v in os.environ.items() if k != "LLM_STREAM_API_KEY"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_stream.client",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, "PYTHONIOENCODING": "utf-8", **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), HANG_GUARD_S)
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8"), err.decode("utf-8")


async def test_cli_streams_the_completion(tiny_server: RunningServer) -> None:
    expected = await tiny_server.stub.Predict(
        make_request("Hello world", max_tokens=8, apply_chat_template=False)
    )
    code, out, err = await run_client(
        "--target", tiny_server.target, "Hello world", "--max-tokens", "8", "--raw"
    )
    assert code == 0, err
    assert out == expected.text + "\n"
    assert "finish=FINISH_REASON_" in err and "completion_tokens=" in err

    code, out, err = await run_client(
        "--target", tiny_server.target, "--unary", "--max-tokens", "8", "--raw", "Hello world"
    )
    assert code == 0, err
    assert out == expected.text + "\n"
    assert f"version={expected.model_version}" in err


async def test_cli_reports_a_bad_request_readably(tiny_server: RunningServer) -> None:
    code, out, err = await run_client(
        "--target", tiny_server.target, "Hello", "--temperature", "-1", "--max-tokens", "4"
    )
    assert code == 1
    assert out == ""
    assert "INVALID_ARGUMENT" in err and "temperature" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


async def test_cli_without_a_server_fails_readably() -> None:
    code, out, err = await run_client("--target", "127.0.0.1:1", "--wait", "0.5", "Hello")
    assert code == 1
    assert out == ""
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


class _Refusals(logging.Handler):
    """Sets an event when the server refuses a request as UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "UNAVAILABLE" in record.getMessage():
            self.seen.set()  # logged by the servicer, on the event loop's thread


async def test_client_retries_while_the_server_warms_up(
    tiny_model_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()

    def slow_load(settings: Settings) -> Sequence[ModelBackend]:
        if not gate.wait(HANG_GUARD_S):
            raise TimeoutError("the test never released the model load")
        return load_configured_models(settings)

    caplog.set_level(logging.INFO, logger="llm_stream")
    refusals = _Refusals()
    logging.getLogger("llm_stream").addHandler(refusals)
    settings = tiny_settings(tiny_model_dir, cache_dir)
    try:
        async with (
            running_server(settings, wait_ready=False, load_models=slow_load) as running,
            InferenceClient(running.target) as client,
        ):
            try:
                answer = asyncio.ensure_future(client.predict("Hello world", max_tokens=3))
                await asyncio.wait_for(refusals.seen.wait(), HANG_GUARD_S)  # refused once...
            finally:
                gate.set()
            response = await asyncio.wait_for(answer, HANG_GUARD_S)  # ...then retried
    finally:
        logging.getLogger("llm_stream").removeHandler(refusals)
    assert response.usage.completion_tokens > 0


async def test_the_readmes_python_example_runs_as_a_script(tiny_server: RunningServer) -> None:
    """The README's async client example, as a user would paste it into a file."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("From Python, frontends import the async client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "localhost:50051" in code
    code = code.replace("localhost:50051", tiny_server.target)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    last = out.decode().strip().splitlines()[-1]
    reasons = {
        "FINISH_REASON_END_OF_SEQUENCE",
        "FINISH_REASON_LENGTH",
        "FINISH_REASON_STOP_SEQUENCE",
    }
    assert last.split(":")[0] in reasons, last
    assert last.endswith(" tokens")
