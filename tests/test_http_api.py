"""The OpenAI-compatible HTTP API, through the official ``openai`` SDK and raw HTTP.

Every test runs a real server (tiny model, real uvicorn on a real port, the same
engine as gRPC) and talks to it over the loopback: chat and completions, streamed
and not, the models list, errors in OpenAI's shape with their HTTP statuses, API
keys, warm-up and drain, and a stream closed by its client, which stops the model
within one decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from llm_stream.access.api_keys import key_id
from llm_stream.app import LLMStreamServer
from llm_stream.engine.engine import EngineState
from llm_stream.engine.types import FinishReason, ModelBackend
from llm_stream.http.app import HTTP_MAX_BODY_BYTES
from llm_stream.logging_setup import LOG_FORMAT, RequestContextFilter
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.settings import Settings
from tests.conftest import RunningServer, free_port, running_server, tiny_settings
from tests.test_api_keys import ALICE, BOB, write_keys
from tests.test_cancellation import eventually
from tests.wrapped_backend import slow_models

HELLO = [{"role": "user", "content": "Hello world"}]
# Tokens: with temperature 0 the tiny model's answer to HELLO runs to max_tokens (no
# end of sequence), so a LONG generation runs until it is cancelled. Sampled (the
# HTTP default is temperature 1) it may end by itself after a few dozen tokens.
LONG = 3500
HANG_GUARD_S = 30


_clients: list[openai.AsyncOpenAI] = []


def sdk(running: RunningServer | str, api_key: str = "unused") -> openai.AsyncOpenAI:
    """The official SDK pointed at a running server (or at an HTTP base URL); closed
    after the test."""
    base_url = running if isinstance(running, str) else running.http_url
    # No retries: a 429 or 503 must reach the test, not be retried by the SDK.
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60
    )
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().close()


def rejected(running: RunningServer, code: str) -> float:
    value = running.server.metrics.registry.get_sample_value(
        "llm_stream_rejected_requests_total", {"code": code}
    )
    return value or 0.0


def assert_openai_error(body: object, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: {"error": {message, type, param, code}}, no trace."""
    assert isinstance(body, dict)
    error = body.get("error", body)  # the SDK hands over the inner object
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert error["param"] == param
    assert error["message"] and "Traceback" not in error["message"]
    return dict(error)


@pytest.fixture(scope="module")
async def http_server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port(), max_concurrent=4)
    async with running_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
async def one_slot(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    """One batch row, no queue, and a model slow enough to be caught mid-stream."""
    settings = tiny_settings(
        tiny_model_dir, cache_dir, http_port=free_port(), max_concurrent=1, max_queue=0
    )
    async with running_server(settings, load_models=slow_models(0.005)) as running:
        yield running


# -- chat and completions --------------------------------------------------------------


async def test_chat_streamed_equals_unary_and_grpc(http_server: RunningServer) -> None:
    client = sdk(http_server)
    request: dict[str, Any] = {"model": "tiny", "messages": HELLO, "max_tokens": 24}
    whole = await client.chat.completions.create(
        **request, temperature=0, extra_headers={"x-request-id": "chat-unary"}
    )
    assert whole.id == "chatcmpl-chat-unary"
    assert whole.object == "chat.completion" and whole.model == "tiny"
    assert whole.system_fingerprint and whole.system_fingerprint.startswith("sha256-")
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in {"stop", "length"}
    assert whole.usage is not None and whole.usage.completion_tokens > 0

    stream = await client.chat.completions.create(
        **request, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1  # it really streamed, piece by piece
    assert "".join(texts) == choice.message.content
    finish, usage = chunks[-2], chunks[-1]
    assert finish.choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert usage.choices == [] and usage.usage is not None
    # The same counts (the second of the same request may reuse the first's prompt KV).
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage.usage, n) for n in counts] == [getattr(whole.usage, n) for n in counts]

    # The same engine and conversion as gRPC: the same greedy answer.
    grpc_request = pb.PredictRequest(model_id="tiny", config=pb.InferenceConfig(max_tokens=24))
    grpc_request.messages.add(role="user", content="Hello world")
    answer = await http_server.stub.Predict(grpc_request, timeout=30)
    assert answer.text == choice.message.content


async def test_raw_server_sent_events(http_server: RunningServer) -> None:
    body = {
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with (
        httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-request-id": "raw-sse"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"] == "raw-sse"
        raw = (await response.aread()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]  # [DONE] ends it
    datas = [event.removeprefix("data: ") for event in events[:-2]]
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-2])
    chunks = [json.loads(data) for data in datas]
    assert all(
        chunk["id"] == "chatcmpl-raw-sse" and chunk["usage"] is None for chunk in chunks[:-1]
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 6


async def test_completions_streamed_and_not(http_server: RunningServer) -> None:
    client = sdk(http_server)
    request: dict[str, Any] = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 12}
    whole = await client.completions.create(**request, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert choice.finish_reason in {"stop", "length"}
    chunks = [
        c async for c in await client.completions.create(**request, temperature=0, stream=True)
    ]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    # The prompt is raw text, no chat template: as gRPC with apply_chat_template false.
    grpc_request = pb.PredictRequest(
        config=pb.InferenceConfig(max_tokens=12, apply_chat_template=False)
    )
    grpc_request.features["prompt"].string_value = "The quick brown"
    answer = await http_server.stub.Predict(grpc_request, timeout=30)
    assert answer.text == choice.text
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == answer.usage.prompt_tokens


async def test_models(http_server: RunningServer) -> None:
    client = sdk(http_server)
    models = await client.models.list()
    assert [model.id for model in models.data] == ["tiny"]
    assert models.data[0].owned_by == "llm-stream"
    assert (await client.models.retrieve("tiny")).id == "tiny"
    with pytest.raises(openai.NotFoundError) as raised:
        await client.models.retrieve("gpt-9")
    assert_openai_error(raised.value.body, "invalid_request_error", "model")


# -- errors ----------------------------------------------------------------------------------


async def test_errors_have_openai_shape_and_status(http_server: RunningServer) -> None:
    client = sdk(http_server)
    before = rejected(http_server, "INVALID_ARGUMENT")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="tiny", messages=HELLO, temperature=-1)
    assert bad.value.status_code == 400
    error = assert_openai_error(bad.value.body, "invalid_request_error", "temperature")
    assert "temperature must be >= 0" in error["message"]
    assert rejected(http_server, "INVALID_ARGUMENT") == before + 1

    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-9", messages=HELLO)
    error = assert_openai_error(missing.value.body, "invalid_request_error", "model")
    assert error["code"] == "model_not_found" and "tiny" in error["message"]
    assert rejected(http_server, "NOT_FOUND") >= 1


async def assert_400(
    server: RunningServer, path: str, body: dict[str, Any], param: str | None, fragment: str
) -> None:
    """POST ``body``: a 400 in OpenAI's shape, naming ``param``, saying ``fragment``."""
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = assert_openai_error(response.json(), "invalid_request_error", param)
    assert fragment in error["message"]


@pytest.mark.parametrize(
    ("patch", "param", "fragment"),
    [
        ({"n": 2}, "n", "n must be 1"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "repetition_penalty"),
        ({"presence_penalty": -1}, "presence_penalty", "not supported"),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "needs functions to call; send them in tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            "names the function 'g', which is not among tools",
        ),
        (
            {"functions": [{"name": "f"}], "function_call": {"name": "g"}},
            "function_call",
            "not among",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools[0].function.parameters",
            "a JSON Schema object, got a string",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "two words"}}]},
            "tools[0].function.name",
            "letters, digits",
        ),
        (
            {"tools": [{"function": {"name": "f"}}, {"function": {"name": "f"}}]},
            "tools[1].function.name",
            "must be unique",
        ),
        ({"tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
        ({"tools": {"name": "f"}}, "tools", "must be an array"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", "only 'function'"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "a string"),
        ({"tools": [], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        ({"response_format": {"type": "xml"}}, "response_format", "'json_schema', got 'xml'"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
            "response_format.json_schema.schema",
            "a JSON Schema object, got an array",
        ),
        ({"max_tokens": 0}, "max_tokens", "must be 1 to 4000 (this server's cap), got 0"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens", "cap of 4000"),
        ({"temperature": "hot"}, "temperature", "must be a number, got a string"),
        ({"top_p": 0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"stop": 7}, "stop", "a string or an array of strings"),
        ({"stop": [""]}, "stop", "each stop sequence must be 1 to"),
        ({"seed": "x"}, "seed", "must be an integer"),
        ({"messages": []}, "messages", "non-empty array"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "got 'robot'"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            },
            "messages[0].tool_calls",
            "only assistant messages carry tool calls",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "a string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
            "text parts",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "conversation is empty"),
        ({"stream": "yes"}, "stream", "true or false"),
    ],
)
async def test_bad_chat_requests_are_400(
    http_server: RunningServer, patch: dict[str, Any], param: str | None, fragment: str
) -> None:
    body = {"model": "tiny", "messages": HELLO, **patch}
    await assert_400(http_server, "/v1/chat/completions", body, param, fragment)


async def test_bad_bodies_and_paths(http_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http:
        not_json = await http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
        assert (
            "not valid JSON"
            in assert_openai_error(not_json.json(), "invalid_request_error")["message"]
        )
        no_prompt = await http.post("/v1/completions", json={"model": "tiny"})
        assert no_prompt.status_code == 400
        assert_openai_error(no_prompt.json(), "invalid_request_error", "prompt")
        unknown = await http.get("/v1/engines")
        assert unknown.status_code == 404
        assert assert_openai_error(unknown.json(), "invalid_request_error")["code"] == "not_found"
        wrong_method = await http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405
        error = assert_openai_error(wrong_method.json(), "invalid_request_error")
        assert error["code"] == "method_not_allowed"
        # Not OpenAI's, for probes and the chat page: health and the page itself.
        health = await http.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "SERVING"}
        page = await http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(
    ("patch", "param", "fragment"),
    [
        ({"n": True}, "n", "n must be an integer, got a boolean"),
        ({"best_of": True}, "best_of", "best_of must be an integer, got a boolean"),
        ({"best_of": 3}, "best_of", "best_of must be 1"),
    ],
)
async def test_n_and_best_of_are_integers(
    http_server: RunningServer, patch: dict[str, Any], param: str, fragment: str
) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, **patch}
    await assert_400(http_server, "/v1/completions", body, param, fragment)


async def test_only_json_bodies_are_taken(http_server: RunningServer) -> None:
    """A web page may POST text/plain (or a form) to any origin without a CORS
    preflight; such a request is refused, so no page can start generations here."""
    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http:
        for content_type in (
            "text/plain",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            headers = {} if content_type is None else {"content-type": content_type}
            refused = await http.post("/v1/chat/completions", content=body, headers=headers)
            assert refused.status_code == 415, content_type
            error = assert_openai_error(refused.json(), "invalid_request_error")
            assert error["code"] == "unsupported_media_type"
            assert "Content-Type: application/json" in error["message"]
            assert refused.headers["x-request-id"]
        # The media type's parameters and case do not matter.
        taken = await http.post(
            "/v1/chat/completions",
            content=body,
            headers={"content-type": "Application/JSON; charset=utf-8"},
        )
        assert taken.status_code == 200, taken.text


async def test_http_bodies_have_their_own_limit(http_server: RunningServer) -> None:
    """2 MiB, far below gRPC's --max-message-mb (100 here): parsing a body holds the
    event loop. Bodies above 64 KiB are parsed and converted on a worker thread."""
    limit = HTTP_MAX_BODY_BYTES
    assert http_server.server.settings.max_message_bytes > limit

    async def just_too_large() -> AsyncIterator[bytes]:  # chunked: counted as it is read
        yield b" " * limit
        yield b" "

    json_headers = {"content-type": "application/json"}
    padding = "x" * 100_000  # "user" is ignored: it only makes the body large
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http:
        refused = await http.post(
            "/v1/chat/completions", content=just_too_large(), headers=json_headers
        )
        assert refused.status_code == 413
        error = assert_openai_error(refused.json(), "invalid_request_error")
        assert error["code"] == "request_too_large" and f"{limit} bytes" in error["message"]
        large = {"messages": HELLO, "max_tokens": 2, "temperature": 0, "user": padding}
        answer = await http.post("/v1/chat/completions", json=large)
        assert answer.status_code == 200, answer.text
        bad = await http.post("/v1/chat/completions", json={**large, "temperature": -1})
        assert bad.status_code == 400
        assert_openai_error(bad.json(), "invalid_request_error", "temperature")


async def test_full_server_is_429_with_retry_after(one_slot: RunningServer) -> None:
    client = sdk(one_slot)
    before = rejected(one_slot, "RESOURCE_EXHAUSTED")
    holder = await client.chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=LONG,
        temperature=0,  # greedy: runs until it is closed
        stream=True,
        extra_headers={"x-request-id": "http-holder"},
    )
    await anext(holder)
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert raised.value.status_code == 429
    assert raised.value.response.headers["retry-after"] == "1"
    assert_openai_error(raised.value.body, "rate_limit_error")
    assert rejected(one_slot, "RESOURCE_EXHAUSTED") == before + 1
    await holder.close()
    record = await one_slot.server.engine.wait_finished("http-holder", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.CANCELLED


# -- cancellation ----------------------------------------------------------------------------


async def assert_model_free(running: RunningServer) -> None:
    answer = await sdk(running).chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


async def test_closing_the_stream_stops_the_model_within_one_step(
    one_slot: RunningServer,
) -> None:
    stream = await sdk(one_slot).chat.completions.create(
        model="tiny",
        messages=HELLO,
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_headers={"x-request-id": "http-cancel"},
    )
    received = [await anext(stream) for _ in range(4)]
    assert received[0].id == "chatcmpl-http-cancel"
    await stream.close()  # the SDK closes the connection mid-stream
    record = await one_slot.server.engine.wait_finished("http-cancel", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
    assert record.completion_tokens < 200 < LONG
    # The response gives its slot back as it finishes closing, soon after the model stops.
    await eventually(lambda: one_slot.server.openai.active == 0)
    await assert_model_free(one_slot)


async def test_leaving_an_unstreamed_request_stops_the_model(one_slot: RunningServer) -> None:
    engine = one_slot.server.engine
    body = {"messages": HELLO, "max_tokens": LONG, "temperature": 0}
    await eventually(lambda: engine.active == 0)  # nothing left over from other tests
    async with httpx.AsyncClient(base_url=one_slot.http_url, timeout=HANG_GUARD_S) as http:
        post = asyncio.create_task(
            http.post("/v1/chat/completions", json=body, headers={"x-request-id": "http-leaver"})
        )
        # Once the model is working on it, the client gives up and hangs up.
        await eventually(lambda: engine.active == 1 or post.done())
        assert not post.done()
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await post
    record = await one_slot.server.engine.wait_finished("http-leaver", HANG_GUARD_S)
    assert record.finish_reason is FinishReason.CANCELLED
    assert record.steps_after_cancel is not None and record.steps_after_cancel <= 1
    assert record.completion_tokens < LONG // 2
    await assert_model_free(one_slot)


# -- API keys ----------------------------------------------------------------------------------


async def test_api_keys_and_the_per_key_cap(
    tiny_model_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    write_keys(keys, ALICE, BOB)
    settings = tiny_settings(
        tiny_model_dir,
        cache_dir,
        http_port=free_port(),
        api_keys_file=keys,
        max_concurrent_per_key=1,
    )
    async with running_server(settings, load_models=slow_models(0.005)) as running:
        async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as http:
            # No key at all (the SDK always sends one): 401, saying how to authenticate.
            for path in ("/v1/models", "/v1/chat/completions"):
                refused = await (
                    http.get(path) if path.endswith("models") else http.post(path, json={})
                )
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"] == "Bearer"
                error = assert_openai_error(refused.json(), "invalid_request_error")
                assert error["code"] == "invalid_api_key" and "Bearer" in error["message"]
            assert (await http.get("/health")).status_code == 200  # no key needed
            assert (await http.get("/")).status_code == 200
        async with sdk(running, api_key="not-a-key") as stranger:
            with pytest.raises(openai.AuthenticationError) as raised:
                await stranger.chat.completions.create(model="tiny", messages=HELLO)
            assert (
                "not valid"
                in assert_openai_error(raised.value.body, "invalid_request_error")["message"]
            )

        alice, bob = sdk(running, ALICE), sdk(running, BOB)
        assert [m.id for m in (await alice.models.list()).data] == ["tiny"]
        holder = await alice.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=LONG, temperature=0, stream=True
        )
        await anext(holder)
        with pytest.raises(openai.RateLimitError) as capped:  # Alice holds her one
            await alice.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert "concurrent generations" in str(capped.value.body)
        answer = await bob.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)
        assert answer.choices[0].finish_reason in {"stop", "length"}
        await holder.close()
        await eventually(lambda: running.server.access.held_by(key_id(ALICE)) == 0)
        await alice.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)


# -- warm-up, drain, ports -------------------------------------------------------------------


def gated(
    gate: threading.Event, load: Callable[[Settings], Sequence[ModelBackend]]
) -> Callable[[Settings], Sequence[ModelBackend]]:
    """A loader that waits for ``gate`` (it runs on a worker thread)."""

    def wait_then_load(settings: Settings) -> Sequence[ModelBackend]:
        gate.wait(HANG_GUARD_S)
        return load(settings)

    return wait_then_load


async def test_503_before_warm_up_and_while_draining(tiny_model_dir: Path, cache_dir: Path) -> None:
    gate = threading.Event()
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port(), drain_grace_s=30)
    # 0.02 s a step: the generation in flight lasts over a minute unless it is closed.
    server = LLMStreamServer(settings, load_models=gated(gate, slow_models(0.02)))
    await server.start()
    drained = False
    try:
        base_url = f"http://127.0.0.1:{server.http_port}"
        client = sdk(base_url)
        with pytest.raises(openai.InternalServerError) as early:
            await client.chat.completions.create(model="tiny", messages=HELLO)
        assert early.value.status_code == 503
        assert early.value.response.headers["retry-after"] == "1"
        error = assert_openai_error(early.value.body, "server_error")
        assert "warming up" in error["message"]
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
            assert (await http.get("/health")).status_code == 503
            assert (await http.get("/v1/models")).status_code == 503

        gate.set()
        assert server.ready is not None
        await asyncio.wait_for(server.ready, HANG_GUARD_S)
        stream = await client.chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=LONG,
            temperature=0,
            stream=True,
            extra_headers={"x-request-id": "http-in-flight"},
        )
        first = await anext(stream)
        assert first.choices[0].delta.role == "assistant"
        drain = asyncio.create_task(server.drain())
        await eventually(lambda: server.engine.state is EngineState.DRAINING)
        # While an HTTP generation is in flight the port stays open and answers 503.
        with pytest.raises(openai.InternalServerError) as late:
            await client.chat.completions.create(model="tiny", messages=HELLO)
        assert late.value.status_code == 503
        assert "shutting down" in assert_openai_error(late.value.body, "server_error")["message"]
        more = [await anext(stream) for _ in range(3)]  # the stream in flight goes on
        assert all(chunk.choices[0].delta.content for chunk in more)
        assert not drain.done()
        await stream.close()  # its client ends it: nothing is left, the drain completes
        record = await server.engine.wait_finished("http-in-flight", HANG_GUARD_S)
        assert record.finish_reason is FinishReason.CANCELLED
        await asyncio.wait_for(drain, HANG_GUARD_S)
        drained = True
    finally:
        gate.set()
        if not drained:
            await server.drain(grace_s=0)


async def test_drain_grace_expiry_ends_streams_as_cancelled(
    tiny_model_dir: Path, cache_dir: Path
) -> None:
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port())
    async with running_server(settings, load_models=slow_models(0.005)) as running:
        stream = await sdk(running).chat.completions.create(
            model="tiny",
            messages=HELLO,
            max_tokens=LONG,
            temperature=0,  # greedy: runs until the drain cuts it
            stream=True,
            extra_headers={"x-request-id": "http-cut"},
        )
        await anext(stream)
        await running.server.drain(grace_s=0.2)
        rest = [chunk async for chunk in stream]  # ends properly: finish_reason, [DONE]
        assert rest[-1].choices[0].finish_reason == "cancelled"
        record = await running.server.engine.wait_finished("http-cut", HANG_GUARD_S)
        assert record.finish_reason is FinishReason.CANCELLED
        assert record.completion_tokens < LONG


async def test_http_port_in_use_is_a_clean_os_error(tiny_model_dir: Path, cache_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LLMStreamServer(tiny_settings(tiny_model_dir, cache_dir, http_port=port))
        with pytest.raises(OSError, match=rf"cannot listen on 127\.0\.0\.1:{port} \(--http-port\)"):
            await server.start()


async def test_every_http_request_gets_an_access_log_line_with_its_id(
    http_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The server's own log format, with the request id of each line in brackets.
    caplog.handler.setFormatter(logging.Formatter(LOG_FORMAT))
    caplog.handler.addFilter(RequestContextFilter())
    caplog.set_level(logging.INFO, logger="llm_stream")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http:
        models = await http.get("/v1/models", headers={"x-request-id": "access-models"})
        streamed = await http.post(
            "/v1/chat/completions",
            json={**body, "stream": True},
            headers={"x-request-id": "access-stream"},
        )
        missing = await http.get("/v1/nothing-here")
    assert models.status_code == 200 and streamed.status_code == 200
    assert missing.status_code == 404
    lines = caplog.text.splitlines()

    def line_of(request: str) -> str:
        found = [line for line in lines if request in line and "llm_stream.http.access" in line]
        assert len(found) == 1, (request, lines)
        return found[0]

    assert "[access-models]" in line_of('"GET /v1/models HTTP/1.1" 200')
    # A stream is logged once it has ended, with all of its bytes.
    stream_line = line_of('"POST /v1/chat/completions HTTP/1.1" 200')
    assert "[access-stream]" in stream_line
    assert f"{len(streamed.content)} bytes" in stream_line
    assert '"GET /v1/nothing-here HTTP/1.1" 404' in caplog.text
    # The generation's own end line carries the same id.
    assert any(
        "[access-stream]" in line and "generation access-stream ended" in line for line in lines
    )


# What Open WebUI attaches to every chat request with its default settings: tools.
OPEN_WEBUI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The built-in {name} tool.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
    for name in ("search_web", "fetch_url", "query_knowledge", "get_current_time")
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", [None, "auto", "none"])
async def test_a_request_offering_tools_gets_a_text_answer_and_says_why(
    http_server: RunningServer, stream: bool, tool_choice: str | None
) -> None:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "tools": OPEN_WEBUI_TOOLS,
        "parallel_tool_calls": True,
        "stream": stream,
    }
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    async with httpx.AsyncClient(base_url=http_server.http_url, timeout=30) as http:
        response = await http.post("/v1/chat/completions", json=body)
        plain = await http.post(
            "/v1/chat/completions", json={k: v for k, v in body.items() if "tool" not in k}
        )
    assert response.status_code == 200, response.text
    header = response.headers["x-llm-stream-tools"]
    assert header.startswith("ignored: ")
    assert ("'none'" in header) == (tool_choice == "none")
    assert "x-llm-stream-tools" not in plain.headers
    # The same answer as without the tools.
    assert response.text.count("data:") == plain.text.count("data:")
    if not stream:
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
        assert choice["finish_reason"] in {"stop", "length"}
        assert "tool_calls" not in choice["message"]


async def test_the_openai_sdk_with_tools_gets_an_answer(http_server: RunningServer) -> None:
    client = sdk(http_server)
    raw = await client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        tools=OPEN_WEBUI_TOOLS,  # type: ignore[arg-type]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert not completion.choices[0].message.tool_calls
    assert raw.headers["x-llm-stream-tools"].startswith("ignored")
