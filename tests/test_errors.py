"""Every error code the contract names: the code, and a message that says what to fix.

Client mistakes never come back as INTERNAL or with a stack trace, and the
server keeps serving afterwards. Overload is RESOURCE_EXHAUSTED at once; a
server bug is INTERNAL naming the request id, with no trace sent to the client.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llm_stream.app import load_configured_models
from llm_stream.engine.types import ModelBackend, StepPlan
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.proto.inference.v1 import inference_pb2_grpc as pb_grpc
from llm_stream.settings import Settings
from tests.conftest import (
    RunningServer,
    collect_stream,
    prompt_request,
    running_server,
    tiny_settings,
)
from tests.tiny_model import build_tiny_model
from tests.wrapped_backend import RunnerWrapper, WrappedBackend, slow_models

LONG = 3500


async def rpc_error(
    stub: pb_grpc.InferenceServiceStub, rpc: str, request: pb.PredictRequest
) -> grpc.aio.AioRpcError:
    """The status a Predict or StreamPredict call ends with; fails if it succeeds."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if rpc == "Predict":
            await stub.Predict(request, timeout=30)
        else:
            await collect_stream(stub, request, timeout=30)
    return raised.value


def assert_clear(error: grpc.aio.AioRpcError, code: grpc.StatusCode, *fragments: str) -> None:
    details = error.details() or ""
    assert error.code() is code, details
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert "Traceback" not in details
    assert 'File "' not in details


def with_feature(**value: Any) -> pb.PredictRequest:
    request = prompt_request(None, max_tokens=4)
    request.features["prompt"].CopyFrom(pb.FeatureValue(**value))
    return request


# (id, request, fragments the message must contain)
INVALID: list[tuple[str, pb.PredictRequest, tuple[str, ...]]] = [
    ("missing prompt", prompt_request(None), ("features['prompt']", "missing", "string_value")),
    (
        "prompt is a float_value",
        with_feature(float_value=1.5),
        ("features['prompt']", "string_value", "float_value"),
    ),
    (
        "prompt is a float_array",
        with_feature(float_array=pb.FloatArray(values=[1.0, 2.0])),
        ("features['prompt']", "string_value", "float_array"),
    ),
    ("prompt has no value", with_feature(), ("features['prompt']", "string_value")),
    ("empty prompt", with_feature(string_value=""), ("features['prompt']", "empty")),
    ("negative temperature", prompt_request(temperature=-0.5), ("temperature", ">= 0", "-0.5")),
    ("NaN temperature", prompt_request(temperature=math.nan), ("temperature", "finite")),
    ("infinite temperature", prompt_request(temperature=math.inf), ("temperature", "finite")),
    ("top_p above 1", prompt_request(top_p=1.5), ("top_p", "(0, 1]", "1.5")),
    ("negative top_p", prompt_request(top_p=-0.1), ("top_p", "(0, 1]", "-0.1")),
    ("NaN top_p", prompt_request(top_p=math.nan), ("top_p", "finite")),
    ("negative top_k", prompt_request(top_k=-3), ("top_k", ">= 0", "-3")),
    (
        "negative repetition_penalty",
        prompt_request(repetition_penalty=-1.0),
        ("repetition_penalty", "> 0", "-1"),
    ),
    ("negative max_tokens", prompt_request(max_tokens=-1), ("config.max_tokens", "1 to", "-1")),
    (
        "max_tokens above the cap",
        prompt_request(max_tokens=4001),
        ("max_tokens", "4001", "cap", "at most 4000"),
    ),
    (
        "too many stop sequences",
        prompt_request(stop=[f"s{i}" for i in range(17)]),
        ("config.stop", "17", "at most 16"),
    ),
    ("empty stop sequence", prompt_request(stop=["ok", ""]), ("config.stop", "1 to 256")),
    ("overlong stop sequence", prompt_request(stop=["x" * 257]), ("config.stop", "1 to 256")),
]


@pytest.mark.parametrize("rpc", ["Predict", "StreamPredict"])
@pytest.mark.parametrize(
    ("request_", "fragments"),
    [pytest.param(request, fragments, id=name) for name, request, fragments in INVALID],
)
async def test_invalid_request_is_invalid_argument(
    tiny_server: RunningServer, rpc: str, request_: pb.PredictRequest, fragments: tuple[str, ...]
) -> None:
    error = await rpc_error(tiny_server.stub, rpc, request_)
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, *fragments)


@pytest.mark.parametrize(
    "config",
    [
        {"top_p": 0.0},  # 0 means unset
        {"top_p": 1.0},
        {"top_k": 0},
        {"repetition_penalty": 0.0},  # 0 means unset
        {"max_tokens": 0},  # the server default
        {"max_tokens": 4000},  # exactly the cap
        {"stop": [f"s{i}" for i in range(16)]},
        {"stop": ["x" * 256]},
        {"temperature": 0.7, "top_p": 0.5, "top_k": 5, "seed": 1, "repetition_penalty": 1.3},
    ],
)
async def test_boundary_values_are_accepted(
    tiny_server: RunningServer, config: dict[str, Any]
) -> None:
    call = tiny_server.stub.StreamPredict(prompt_request("Hello", **config), timeout=30)
    first = await call.read()  # a generated token, not an error status
    call.cancel()
    assert isinstance(first, pb.PredictToken)
    assert not first.is_final or first.usage.completion_tokens == 0


async def test_max_tokens_zero_uses_the_server_default(tiny_server: RunningServer) -> None:
    response = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=0))
    default = tiny_server.server.settings.default_max_tokens
    assert response.usage.completion_tokens <= default
    if response.finish_reason == pb.FINISH_REASON_LENGTH:
        assert response.usage.completion_tokens == default


@pytest.mark.parametrize("rpc", ["Predict", "StreamPredict"])
async def test_unknown_model_is_not_found_naming_served_models(
    tiny_server: RunningServer, rpc: str
) -> None:
    request = prompt_request("Hello", max_tokens=2)
    request.model_id = "gpt-17"
    error = await rpc_error(tiny_server.stub, rpc, request)
    assert_clear(error, grpc.StatusCode.NOT_FOUND, "'gpt-17'", "serves: tiny")


async def test_empty_model_id_is_the_default_model(tiny_server: RunningServer) -> None:
    anonymous = await tiny_server.stub.Predict(prompt_request("Hello", max_tokens=3))
    named_request = prompt_request("Hello", max_tokens=3)
    named_request.model_id = "tiny"
    named = await tiny_server.stub.Predict(named_request)
    assert anonymous.model_version == named.model_version
    assert anonymous.model_version == tiny_server.server.engine.backend_for("tiny").version
    assert anonymous.text == named.text


async def test_contract_check_unknown_service_is_not_found(tiny_server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await tiny_server.stub.Check(pb.HealthCheckRequest(service="nope.v1.Nothing"))
    assert_clear(raised.value, grpc.StatusCode.NOT_FOUND, "'nope.v1.Nothing'", "InferenceService")


async def test_standard_health_unknown_service_is_not_found(tiny_server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await tiny_server.health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nothing"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_server_keeps_serving_after_bad_requests(tiny_server: RunningServer) -> None:
    bad = [tiny_server.stub.Predict(request) for _, request, _ in INVALID]
    outcomes = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
    codes = {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
    good = await tiny_server.stub.Predict(prompt_request("Hello world", max_tokens=5))
    assert good.usage.completion_tokens > 0
    tokens = await collect_stream(tiny_server.stub, prompt_request("Hello world", max_tokens=5))
    assert tokens[-1].is_final
    await wait_in_flight_zero(tiny_server)  # every slot is given back


# -- prompts that do not fit the model's context -------------------------------


@pytest.fixture(scope="module")
async def small_context_server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> AsyncIterator[RunningServer]:
    folder = build_tiny_model(tmp_path_factory.mktemp("small") / "small", context=64)
    settings = tiny_settings(folder, cache_dir, models=(f"small={folder}",))
    async with running_server(settings) as running:
        yield running


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20  # far over 64 tokens


@pytest.mark.parametrize("rpc", ["Predict", "StreamPredict"])
async def test_prompt_longer_than_context(small_context_server: RunningServer, rpc: str) -> None:
    error = await rpc_error(small_context_server.stub, rpc, prompt_request(LONG_PROMPT))
    assert_clear(
        error, grpc.StatusCode.INVALID_ARGUMENT, "tokens", "at most 64", "shorten the prompt"
    )


async def test_prompt_plus_max_tokens_over_context(small_context_server: RunningServer) -> None:
    prompt = "Hello world"
    fits = await small_context_server.stub.Predict(prompt_request(prompt, max_tokens=1))
    room = 64 - fits.usage.prompt_tokens
    error = await rpc_error(
        small_context_server.stub, "Predict", prompt_request(prompt, max_tokens=room + 1)
    )
    assert_clear(
        error,
        grpc.StatusCode.INVALID_ARGUMENT,
        f"max_tokens ({room + 1})",
        "context of 64",
        f"at most {room} tokens",
    )
    # Exactly the room left is fine.
    response = await small_context_server.stub.Predict(
        prompt_request(prompt, max_tokens=room), timeout=60
    )
    assert response.usage.prompt_tokens + response.usage.completion_tokens <= 64


async def test_default_max_tokens_is_clamped_to_the_context(
    small_context_server: RunningServer,
) -> None:
    """Only an explicit max_tokens is an error; the server default shrinks to fit."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 3 + "Hello world! Bonjour le monde."
    response = await small_context_server.stub.Predict(prompt_request(prompt, max_tokens=0))
    assert 64 - 16 < response.usage.prompt_tokens < 64  # the default of 16 would not fit
    assert response.usage.prompt_tokens + response.usage.completion_tokens <= 64


# -- overload --------------------------------------------------------------------


async def wait_in_flight(running: RunningServer, count: int) -> None:
    """Until exactly ``count`` requests hold or wait for a slot (the engine has no event)."""

    async def reached() -> None:
        while running.server.engine.in_flight != count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(reached(), 30)


async def wait_in_flight_zero(running: RunningServer) -> None:
    await wait_in_flight(running, 0)


async def test_overload_is_resource_exhausted_at_once(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, max_concurrent=1, max_queue=1)
    async with running_server(settings, load_models=slow_models(0.01)) as running:
        stub = running.stub
        holder = stub.StreamPredict(prompt_request("hold the slot", max_tokens=LONG))
        await holder.read()  # decoding for 35 s: the only batch row stays taken
        queued = asyncio.ensure_future(stub.Predict(prompt_request("queued", max_tokens=3)))
        await wait_in_flight(running, 2)

        # Past both limits: refused at once (a waiting call would hit the deadline).
        for rpc in ("Predict", "StreamPredict"):
            error = await rpc_error(stub, rpc, prompt_request("one too many", max_tokens=3))
            assert_clear(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "retry")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.BatchPredict(
                pb.BatchPredictRequest(requests=[prompt_request("b", max_tokens=2)]), timeout=30
            )
        assert_clear(raised.value, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
        assert not queued.done()

        holder.cancel()
        queued_response = await asyncio.wait_for(queued, 30)
        assert queued_response.usage.completion_tokens > 0
        await wait_in_flight_zero(running)
        again = await asyncio.gather(
            stub.Predict(prompt_request("after", max_tokens=3), timeout=30),
            stub.Predict(prompt_request("after", max_tokens=3), timeout=30),
        )
        assert all(r.usage.completion_tokens > 0 for r in again)


# -- a server bug ----------------------------------------------------------------

BUG_PROMPT = "trigger the simulated bug"
SECRET = "tensor on fire at 0xdeadbeef"


class BuggyRunner(RunnerWrapper):
    """A real runner whose step hits an unexpected exception for one prompt."""

    def launch(self, plan: StepPlan) -> None:
        if any(chunk.prepared.request.prompt == BUG_PROMPT for chunk in plan.prefill):
            raise RuntimeError(SECRET)
        self.inner.launch(plan)


def load_buggy(settings: Settings) -> list[ModelBackend]:
    return [WrappedBackend(backend, BuggyRunner) for backend in load_configured_models(settings)]


async def test_unexpected_failure_is_internal_without_trace(
    tiny_model_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir)
    async with running_server(settings, load_models=load_buggy) as running:
        for rpc in ("Predict", "StreamPredict"):
            request = prompt_request(BUG_PROMPT, max_tokens=3)
            request.request_id = f"bug-{rpc}"
            error = await rpc_error(running.stub, rpc, request)
            assert_clear(error, grpc.StatusCode.INTERNAL, f"bug-{rpc}", "server log")
            assert SECRET not in (error.details() or "")
            assert "RuntimeError" not in (error.details() or "")

        # In BatchPredict the failure is that item's own result; the call succeeds.
        buggy_item = prompt_request(BUG_PROMPT, max_tokens=2)
        buggy_item.request_id = "bug-item"
        batch = await running.stub.BatchPredict(
            pb.BatchPredictRequest(requests=[buggy_item]), timeout=30
        )
        item_error = batch.results[0].error
        assert item_error.code == grpc.StatusCode.INTERNAL.value[0]
        assert "bug-item" in item_error.message and "server log" in item_error.message
        assert SECRET not in item_error.message and "RuntimeError" not in item_error.message

        # The server log has the details, with the request id.
        logged = [
            r.getMessage()
            for r in caplog.records
            if r.exc_info and r.exc_info[1] is not None and SECRET in str(r.exc_info[1])
        ]
        assert any("bug-Predict" in message for message in logged), logged
        assert any("bug-item" in message for message in logged), logged

        # And it keeps serving, on every RPC.
        good = await running.stub.Predict(prompt_request("Hello world", max_tokens=4), timeout=30)
        assert good.usage.completion_tokens > 0
        tokens = await collect_stream(running.stub, prompt_request("Hello", max_tokens=4))
        assert tokens[-1].is_final
        batch = await running.stub.BatchPredict(
            pb.BatchPredictRequest(requests=[prompt_request("Hello", max_tokens=2)]), timeout=30
        )
        assert batch.results[0].WhichOneof("outcome") == "response"
        await wait_in_flight_zero(running)


@pytest.mark.parametrize("method", ["Check", "Watch"])
async def test_undecodable_health_requests_are_invalid_argument(
    tiny_server: RunningServer, method: str
) -> None:
    """grpc.health.v1 decodes like the service does: no UNKNOWN naming a Python class."""
    path = f"/grpc.health.v1.Health/{method}"
    garbage = b"\x0a\x05ab"  # a string field cut short
    call: Any
    if method == "Check":
        call = tiny_server.channel.unary_unary(path)(garbage, timeout=10)
    else:
        call = tiny_server.channel.unary_stream(path)(garbage, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if method == "Check":
            await call
        else:
            async for _ in call:
                pass
    assert_clear(
        raised.value, grpc.StatusCode.INVALID_ARGUMENT, "grpc.health.v1.HealthCheckRequest"
    )
    assert "<class" not in (raised.value.details() or "")


async def test_undecodable_reflection_requests_are_invalid_argument(
    tiny_server: RunningServer,
) -> None:
    call = tiny_server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )(iter([b"\x0a\x05ab"]), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    assert_clear(
        raised.value,
        grpc.StatusCode.INVALID_ARGUMENT,
        "grpc.reflection.v1alpha.ServerReflectionRequest",
    )
    assert "<class" not in (raised.value.details() or "")
