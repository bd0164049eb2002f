"""Tools and structured output through both faces, on a real server with the tiny
random-weight model: the official openai SDK over HTTP, and the gRPC contract.

Random weights say nothing useful, so what is checked is what guided decoding
promises whatever the model: a forced tool call names an offered function with
arguments that match its schema, and ``response_format`` output parses and
matches its schema (checked with ``jsonschema``), streamed or not.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import grpc
import httpx2 as httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion

from llm_stream.proto.inference.v1 import inference_pb2 as pb
from tests.conftest import RunningServer, free_port, running_server, tiny_settings
from tests.test_client import run_client
from tests.test_http_api import assert_openai_error, sdk

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone",
            "parameters": TIME_PARAMETERS,
        },
    },
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Nested objects, enums, arrays, required fields, bounded strings: random weights
# left to themselves ramble inside strings, so strings have a maxLength.
RECIPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "course": {"type": "string", "enum": ["starter", "main", "dessert"]},
        "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "vegetarian": {"type": "boolean"},
        "ingredients": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "maxLength": 8},
                    "grams": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["item", "grams"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "course", "servings", "vegetarian", "ingredients"],
    "additionalProperties": False,
}
# Enough room for the JSON to close: finish_reason "length" would mean a cut answer.
MAX_TOKENS = 400


@pytest.fixture(scope="module")
async def server(tiny_model_dir: Path, cache_dir: Path) -> AsyncIterator[RunningServer]:
    settings = tiny_settings(tiny_model_dir, cache_dir, http_port=free_port(), max_concurrent=8)
    async with running_server(settings) as running:
        yield running


def assert_valid_calls(calls: list[Any], allowed: set[str]) -> None:
    assert calls, "no tool calls"
    ids = set()
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_") and call.id not in ids
        ids.add(call.id)
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


async def ask_tiny(server: RunningServer, **fields: Any) -> ChatCompletion:
    """A chat completion through the openai SDK: the tiny model asked ASK, with room
    for the JSON to close, unless ``fields`` say otherwise."""
    request: dict[str, Any] = {"model": "tiny", "messages": ASK, "max_tokens": MAX_TOKENS}
    return await sdk(server).chat.completions.create(**{**request, **fields})


# -- tools over HTTP ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_required_call_is_valid_whatever_the_model(
    server: RunningServer, seed: int
) -> None:
    completion = await ask_tiny(server, tools=TOOLS, tool_choice="required", seed=seed)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    assert_valid_calls(list(choice.message.tool_calls or ()), {"get_weather", "get_time"})


class Place(pydantic.BaseModel):
    city: Literal["Paris", "Tokyo"]


class Trip(pydantic.BaseModel):
    origin: Place
    stops: list[Place] = pydantic.Field(max_length=2)


async def test_a_required_call_to_a_pydantic_tool_with_refs_is_valid(
    server: RunningServer,
) -> None:
    """The SDK's pydantic_function_tool writes parameters that refer to their own root
    (``#/$defs/Place``); inside the forced-call schema they must still resolve."""
    tool = openai.pydantic_function_tool(Trip, name="plan_trip")
    parameters = tool["function"]["parameters"]  # type: ignore[typeddict-item]
    assert "$defs" in parameters
    completion = await ask_tiny(server, tools=[tool], tool_choice="required", seed=5)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls or ():
        assert call.function.name == "plan_trip"  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        jsonschema.validate(arguments, parameters)
        Trip.model_validate(arguments)
    assert choice.message.tool_calls


async def test_a_named_function_is_the_one_called(server: RunningServer) -> None:
    completion = await ask_tiny(
        server,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    calls = list(completion.choices[0].message.tool_calls or ())
    assert_valid_calls(calls, {"get_time"})
    assert len(calls) == 1


async def test_one_call_only_without_parallel_tool_calls(server: RunningServer) -> None:
    for seed in range(4):
        completion = await ask_tiny(
            server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed
        )
        assert len(completion.choices[0].message.tool_calls or ()) == 1


async def test_a_streamed_required_call_arrives_as_tool_call_deltas(
    server: RunningServer,
) -> None:
    """Streamed with the SDK's own accumulator: the chunks are OpenAI's delta.tool_calls
    (index, id, name, then arguments), and the whole equals the unstreamed answer."""
    request: dict[str, Any] = {
        "model": "tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    client = sdk(server)
    whole = await client.chat.completions.create(**request)
    async with client.chat.completions.stream(**request) as stream:
        deltas = [
            event.chunk.choices[0].delta
            async for event in stream
            if event.type == "chunk" and event.chunk.choices
        ]
        final = await stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    calls = list(streamed.message.tool_calls or ())
    assert_valid_calls(calls, {"get_weather", "get_time"})
    expected = whole.choices[0].message.tool_calls or []
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    assert not any(delta.content for delta in deltas)
    firsts = [d.tool_calls[0] for d in deltas if d.tool_calls and d.tool_calls[0].id]
    assert [f.function.name for f in firsts if f.function] == [c.function.name for c in calls]


async def test_tool_choice_none_and_a_template_without_tools_answer_in_text(
    server: RunningServer,
) -> None:
    """The tiny model's template takes no tools: "auto" answers in text, and says so."""
    client = sdk(server)
    for choice in ("none", "auto"):
        raw = await client.chat.completions.with_raw_response.create(
            model="tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice=choice,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
        )
        completion = raw.parse()
        assert completion.choices[0].finish_reason in {"stop", "length"}
        assert not completion.choices[0].message.tool_calls
        assert raw.headers["x-llm-stream-tools"].startswith("ignored: ")


async def test_a_conversation_with_tool_results_carries_on(server: RunningServer) -> None:
    client = sdk(server)
    first = await client.chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    message = first.choices[0].message
    calls = list(message.tool_calls or ())
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}
        for call in calls
    ]
    turns = [*ASK, message.model_dump(exclude_none=True), *results]
    second = await client.chat.completions.create(
        model="tiny",
        messages=turns,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=8,
        temperature=0,
    )
    assert second.choices[0].message.content is not None
    # The calls and their results reached the prompt (the tiny template takes no
    # tools, so they are shown to it as text).
    alone = await client.chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=1,
    )
    assert second.usage is not None and alone.usage is not None
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10


# -- structured output over HTTP ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [5, 6])
async def test_json_schema_output_matches_its_schema(
    server: RunningServer, stream: bool, seed: int
) -> None:
    client = sdk(server)
    request: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "A recipe, please."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "recipe", "schema": RECIPE_SCHEMA},
        },
        "max_tokens": MAX_TOKENS,
        "seed": seed,
    }
    if stream:
        chunks = await client.chat.completions.create(**request, stream=True)
        pieces, finish = [], None
        async for chunk in chunks:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        text = "".join(pieces)
    else:
        completion = await client.chat.completions.create(**request)
        text = completion.choices[0].message.content or ""
        finish = completion.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), RECIPE_SCHEMA)


async def test_json_object_output_is_a_json_object(server: RunningServer) -> None:
    completion = await sdk(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a cat in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    text = completion.choices[0].message.content or ""
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # free-form JSON may go on past max_tokens; what came must still be JSON's start
        assert completion.choices[0].finish_reason == "length"
        assert text.lstrip().startswith("{")


async def test_constrained_and_free_rows_share_the_batch(server: RunningServer) -> None:
    """A free answer is the same beside constrained ones as alone."""
    import asyncio

    client = sdk(server)
    free: dict[str, Any] = {"model": "tiny", "messages": ASK, "max_tokens": 24, "temperature": 0}
    alone = await client.chat.completions.create(**free)
    constrained = [
        client.chat.completions.create(
            model="tiny",
            messages=ASK,  # type: ignore[arg-type]
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "recipe", "schema": RECIPE_SCHEMA},
            },
            max_tokens=MAX_TOKENS,
            seed=seed,
        )
        for seed in range(3)
    ]
    together = await asyncio.gather(client.chat.completions.create(**free), *constrained)
    assert together[0].choices[0].message.content == alone.choices[0].message.content
    for completion in together[1:]:
        jsonschema.validate(json.loads(completion.choices[0].message.content or ""), RECIPE_SCHEMA)


async def test_a_schema_the_grammar_engine_refuses_is_a_400(server: RunningServer) -> None:
    body = {
        "model": "tiny",
        "messages": ASK,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/$defs/nope"}},
        },
    }
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = assert_openai_error(response.json(), "invalid_request_error", "response_format")
    assert error["message"].startswith("response_format: the JSON schema cannot be used")
    # and the server goes on serving
    completion = await sdk(server).chat.completions.create(
        model="tiny",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=2,
    )
    assert completion.choices


async def test_the_sdk_raises_bad_request_for_an_unknown_named_function(
    server: RunningServer,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(server).chat.completions.create(
            model="tiny",
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "launch"}},
        )
    assert "'launch', which is not among tools" in str(raised.value)


# -- the same over gRPC ------------------------------------------------------------------------


def grpc_tools() -> list[pb.Tool]:
    return [
        pb.Tool(
            name=tool["function"]["name"],
            description=tool["function"]["description"],
            parameters_json=json.dumps(tool["function"]["parameters"]),
        )
        for tool in TOOLS
    ]


def asking(**fields: Any) -> pb.PredictRequest:
    request = pb.PredictRequest(
        messages=[pb.ChatMessage(role="user", content="What is the weather in Paris?")],
        config=pb.InferenceConfig(max_tokens=MAX_TOKENS),
        **fields,
    )
    return request


async def test_grpc_required_call_in_predict_and_stream(server: RunningServer) -> None:
    request = asking(tools=grpc_tools(), tool_choice="required")
    response = await server.stub.Predict(request)
    assert response.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert response.tool_calls and response.content == ""
    for call in response.tool_calls:
        jsonschema.validate(json.loads(call.arguments_json), PARAMETERS[call.name])
    tokens = [token async for token in server.stub.StreamPredict(request)]
    final = tokens[-1]
    assert final.is_final and final.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert [(c.name, c.arguments_json) for c in final.tool_calls] == [
        (c.name, c.arguments_json) for c in response.tool_calls
    ]
    assert "".join(t.token for t in tokens[:-1]) == response.text


async def test_grpc_says_in_its_headers_when_tools_were_left_out(server: RunningServer) -> None:
    """The tiny model's template takes no tools: ``auto`` answers in text, and says so."""
    request = asking(tools=grpc_tools())
    request.config.max_tokens = 4
    call = server.stub.Predict(request)
    response = await call
    assert response.finish_reason != pb.FINISH_REASON_TOOL_CALLS and not response.tool_calls
    header = dict(await call.initial_metadata())["x-llm-stream-tools"]
    assert header.startswith("ignored: ") and "takes no tools" in header
    stream = server.stub.StreamPredict(request)
    [token async for token in stream]
    assert "x-llm-stream-tools" in dict(await stream.initial_metadata())
    short = asking()
    short.config.max_tokens = 2
    plain = server.stub.Predict(short)
    await plain
    assert "x-llm-stream-tools" not in dict(await plain.initial_metadata())


async def test_grpc_json_schema_and_its_errors(server: RunningServer) -> None:
    request = asking()
    request.config.json_schema = json.dumps(RECIPE_SCHEMA)
    response = await server.stub.Predict(request)
    assert response.finish_reason == pb.FINISH_REASON_END_OF_SEQUENCE
    jsonschema.validate(json.loads(response.text), RECIPE_SCHEMA)
    request.config.json_schema = "{not json"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Predict(request)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("config.json_schema is not valid JSON")
    request.config.json_schema = json.dumps({"type": "object", "$ref": "#/$defs/nope"})
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.StreamPredict(request).read()
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith("config.json_schema: the JSON schema cannot be used"), details
    # In a batch only that item fails, with the same message.
    batch = await server.stub.BatchPredict(pb.BatchPredictRequest(requests=[asking(), request]))
    assert batch.results[0].WhichOneof("outcome") == "response"
    assert batch.results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert batch.results[1].error.message == details
    named = asking(tools=grpc_tools(), tool_choice="launch")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Predict(named)
    assert "not among tools" in (raised.value.details() or "")


async def test_the_cli_answers_to_a_json_schema_file(server: RunningServer, tmp_path: Path) -> None:
    schema_file = tmp_path / "recipe.json"
    schema_file.write_text(json.dumps(RECIPE_SCHEMA), encoding="utf-8")
    args = ("--target", server.target, "--max-tokens", str(MAX_TOKENS), "--seed", "3")
    code, out, err = await run_client(*args, "--json-schema", str(schema_file), "A recipe")
    assert code == 0, err
    jsonschema.validate(json.loads(out), RECIPE_SCHEMA)
    assert "finish=FINISH_REASON_END_OF_SEQUENCE" in err
    schema_file.write_text("[1, 2", encoding="utf-8")
    code, out, err = await run_client(*args, "--json-schema", str(schema_file), "A recipe")
    assert code == 2 and out == ""
    assert "is not valid JSON" in err and "Traceback" not in err


async def test_deeply_nested_json_in_a_request_is_a_400_not_a_500(server: RunningServer) -> None:
    deep = "[" * 5000
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        response = await http.post("/v1/chat/completions", json={"messages": history})
        assert response.status_code == 400, response.text
        assert "not valid JSON" in response.json()["error"]["message"]
        bad_tool = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
        response = await http.post(
            "/v1/chat/completions", json={"messages": ASK, "tools": bad_tool}
        )
        assert response.status_code == 400, response.text
    request = asking()
    request.config.json_schema = deep
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.stub.Predict(request)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
