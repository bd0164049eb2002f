"""The front door's checks as pure functions: one request shape, one set of rules,
whichever face filled it in; and the one error table both faces read."""

from __future__ import annotations

import json
from typing import Any

import grpc
import jsonschema
import pytest

from llm_stream.engine.types import ChatTurn, JsonConstraint, ToolCall, ToolSpec
from llm_stream.errors import (
    ERROR_KINDS,
    INTERNAL,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    RequestTooLargeError,
    kind_of,
)
from llm_stream.front_door.request import (
    RequestDraft,
    RequestLimits,
    forced_calls_schema,
    validate,
)
from llm_stream.front_door.tools import tool_reading
from llm_stream.http.errors import reply_for
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.protocol.convert import draft_from_pb
from llm_stream.protocol.status import status_for

LIMITS = RequestLimits(default_max_tokens=16, max_tokens_cap=64)
HELLO = (ChatTurn("user", "hello"),)
WEATHER = ToolSpec(
    "get_weather",
    "The weather in a city",
    json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}),
)
TIME = ToolSpec("get_time")


def draft(**fields: Any) -> RequestDraft:
    return RequestDraft(**{"request_id": "r", "messages": HELLO, **fields})


def refusal(**fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        validate(draft(**fields), LIMITS)
    return raised.value


def test_left_out_sampling_fields_are_filled_by_the_model_later() -> None:
    sampling = validate(draft(), LIMITS).generation.sampling
    assert sampling.unset == {"temperature", "top_p", "top_k", "repetition_penalty"}
    assert sampling.max_tokens == 16 and not sampling.max_tokens_explicit
    sent = validate(draft(temperature=0.0, max_tokens=64, top_p=0.5), LIMITS).generation.sampling
    assert sent.greedy and sent.max_tokens_explicit and sent.top_p == 0.5
    assert sent.unset == {"top_k", "repetition_penalty"}


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"max_tokens": 0}, "max_tokens", "must be 1 to 64 (this server's cap), got 0"),
        ({"max_tokens": 65}, "max_tokens", "above this server's cap of 64"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"temperature": -1.0}, "temperature", ">= 0"),
        ({"top_k": -2}, "top_k", ">= 0"),
        ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0"),
        ({"stop": ("",)}, "stop", "1 to 256"),
        ({"messages": (ChatTurn("robot", "x"),)}, "messages[0].role", "got 'robot'"),
        ({"messages": (ChatTurn("user", ""),)}, "messages", "conversation is empty"),
        ({"continue_final_message": True}, "continue_final_message", "assistant message"),
    ],
)
def test_each_value_is_checked_once_naming_its_field(
    fields: dict[str, Any], field: str, fragment: str
) -> None:
    error = refusal(**fields)
    assert error.field == field
    assert fragment in str(error)


def test_a_face_spells_the_fields_its_own_way() -> None:
    error = refusal(top_p=2.0, names={"top_p": "config.top_p"})
    assert error.field == "config.top_p"
    assert str(error).startswith("config.top_p must be")


def test_grpc_zeros_mean_left_out_and_its_names_say_config() -> None:
    message = pb.PredictRequest(config=pb.InferenceConfig(max_tokens=-1))
    message.features["prompt"].string_value = "hi"
    with pytest.raises(InvalidRequestError) as raised:
        validate(draft_from_pb(message, "r"), LIMITS)
    assert raised.value.field == "config.max_tokens"
    message.config.max_tokens = 0
    message.config.use_model_temperature = True
    sampling = validate(draft_from_pb(message, "r"), LIMITS).generation.sampling
    assert not sampling.max_tokens_explicit and "temperature" in sampling.unset


def test_tools_are_checked() -> None:
    assert refusal(tools=(ToolSpec("two words"),)).field == "tools[0].function.name"
    assert "unique" in str(refusal(tools=(TIME, TIME)))
    bad = ToolSpec("f", parameters="[1]")
    assert refusal(tools=(bad,)).field == "tools[0].function.parameters"
    assert "needs functions" in str(refusal(tool_choice="required"))
    assert "not among" in str(refusal(tools=(TIME,), tool_choice="function", tool_name="x"))
    assert refusal(tool_choice="sometimes").field == "tool_choice"
    calls = (ToolCall("c1", "f", "{not json"),)
    turns = (*HELLO, ChatTurn("assistant", "", calls))
    assert refusal(messages=turns).field == "messages[1].tool_calls[0].function.arguments"
    wrong = (ChatTurn("user", "x", (ToolCall("c1", "f", "{}"),)),)
    assert "only assistant messages" in str(refusal(messages=wrong))


def test_tool_choice_decides_what_reaches_the_model() -> None:
    auto = validate(draft(tools=(WEATHER,)), LIMITS)
    assert auto.tool_mode == "auto" and auto.generation.tools == (WEATHER,)
    assert auto.generation.constraint is None
    none = validate(draft(tools=(WEATHER,), tool_choice="none"), LIMITS)
    assert none.tool_mode == "none" and none.generation.tools == () and none.tools_offered == 1
    assert tool_reading(none, "m", "hermes").ignored == "tool_choice is 'none'"
    # A response_format schema leaves no room for a call: the tools are left out, said so.
    shaped = validate(draft(tools=(WEATHER,), json_schema=""), LIMITS)
    assert shaped.tool_mode == "none" and shaped.generation.tools == ()
    assert shaped.generation.constraint == JsonConstraint("")
    assert "json_schema makes the answer JSON" in (
        tool_reading(shaped, "m", "hermes").ignored or ""
    )
    assert not tool_reading(auto, "m", "hermes").ignored
    forced = validate(draft(tools=(WEATHER, TIME), tool_choice="required"), LIMITS)
    assert forced.tool_mode == "forced" and forced.generation.tools == (WEATHER, TIME)
    assert forced.generation.constraint is not None
    schema = json.loads(forced.generation.constraint.schema)
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [
        ["get_weather"],
        ["get_time"],
    ]
    named = validate(
        draft(tools=(WEATHER, TIME), tool_choice="function", tool_name="get_time"), LIMITS
    )
    assert named.generation.constraint is not None
    only = json.loads(named.generation.constraint.schema)
    assert only["items"]["properties"]["name"]["enum"] == ["get_time"]


def test_the_forced_schema_holds_one_call_unless_parallel() -> None:
    assert forced_calls_schema((WEATHER,), parallel=False)["maxItems"] == 1
    assert "maxItems" not in forced_calls_schema((WEATHER,), parallel=True)
    schema = forced_calls_schema((WEATHER,), parallel=True)
    assert schema["items"]["required"] == ["name", "arguments"]
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Paris"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "arguments": {"city": 3}}], schema)


def test_the_forced_schema_keeps_each_tools_own_references() -> None:
    """Parameters that refer to their own root (pydantic's ``#/$defs/...``, a recursive
    ``#``) still mean the same inside the array of calls."""
    tree = {
        "type": "object",
        "properties": {
            "leaf": {"$ref": "#/$defs/Leaf"},
            "children": {"type": "array", "items": {"$ref": "#"}},
            "example": {"const": {"$ref": "#/not/a/reference"}},
        },
        "required": ["leaf"],
        "$defs": {"Leaf": {"type": "object", "properties": {"n": {"type": "integer"}}}},
    }
    tools = (ToolSpec("tree", "", json.dumps(tree)), WEATHER)
    schema = forced_calls_schema(tools, parallel=True)
    good = {"leaf": {"n": 1}, "children": [{"leaf": {"n": 2}, "children": []}]}
    jsonschema.validate([{"name": "tree", "arguments": good}], schema)
    for bad in ({"leaf": {"n": "x"}}, {"leaf": {}, "children": [{"children": []}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "tree", "arguments": bad}], schema)
    constant = schema["$defs"]["tool0_tree"]["properties"]["example"]
    assert constant == {"const": {"$ref": "#/not/a/reference"}}


def test_structured_output_becomes_a_constraint() -> None:
    assert validate(draft(json_schema=""), LIMITS).generation.constraint == JsonConstraint("")
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
    constraint = validate(draft(json_schema=schema), LIMITS).generation.constraint
    assert constraint == JsonConstraint(schema)
    assert "not valid JSON" in str(refusal(json_schema="{nope"))
    assert "must be a JSON object" in str(refusal(json_schema="[]"))
    carried = (*HELLO, ChatTurn("assistant", '{"a": '))
    error = refusal(messages=carried, continue_final_message=True, json_schema="")
    assert "cannot be combined" in str(error)


@pytest.mark.parametrize(
    ("error", "code", "status"),
    [
        (InvalidRequestError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
        (RequestTooLargeError("x"), grpc.StatusCode.INVALID_ARGUMENT, 413),
        (ModelNotFoundError("x"), grpc.StatusCode.NOT_FOUND, 404),
        (OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (RuntimeError("secret trace"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_one_table_gives_both_faces_their_answer(
    error: Exception, code: grpc.StatusCode, status: int
) -> None:
    grpc_code, grpc_message = status_for(error, "req-1")
    reply = reply_for(error, "req-1")
    assert grpc_code is code and reply.kind.http_status == status
    assert grpc_message == reply.message
    assert "secret" not in reply.message
    assert kind_of(error) is (INTERNAL if status == 500 else ERROR_KINDS[type(error)])


def test_an_invalid_requests_field_is_openais_param() -> None:
    reply = reply_for(InvalidRequestError("top_p must be in (0, 1]", "top_p"), "r")
    assert reply.body()["error"]["param"] == "top_p"
    assert reply_for(ModelNotFoundError("no"), "r").param == "model"
