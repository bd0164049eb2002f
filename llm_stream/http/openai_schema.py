"""OpenAI request bodies -> the front door's ``RequestDraft``; results -> OpenAI JSON.

A body is checked here only for what is OpenAI's own: JSON shapes and types,
parameters this server cannot honour (``n`` > 1, ``logprobs``, non-zero
``frequency_penalty``...), which are refused by name rather than ignored. The
values themselves (ranges, stop sequences, roles, tools, schemas, an empty
conversation) are then checked by :func:`llm_stream.front_door.request.validate`,
as for the gRPC port, so both accept and refuse the same requests. Fields this
module does not name (``user``, ``metadata``, ``store``...) are ignored, as chat
UIs send many.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_stream.engine.types import (
    ChatTurn,
    Completion,
    FinishReason,
    StreamEnd,
    ToolCall,
    ToolSpec,
)
from llm_stream.errors import InvalidRequestError, quoted_input
from llm_stream.front_door.request import RequestDraft
from llm_stream.front_door.tools import ToolReading, finish_with_calls, read_tool_calls
from llm_stream.tool_calls import ContentDelta, ToolCallDelta, stream_for

JsonObject = dict[str, Any]

INT32_MAX = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)

# OpenAI's finish reasons; a generation stopped by the server (drain) is "cancelled".
FINISH_REASONS = {
    FinishReason.END_OF_SEQUENCE: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
}

# OpenAI's newer name for the system role.
ROLE_ALIASES = {"developer": "system"}

OWNER = "llm-stream"


@dataclass(frozen=True)
class OpenAIRequest:
    """A body turned into the shared request, plus how to answer it."""

    draft: RequestDraft
    stream: bool
    include_usage: bool


def _invalid(param: str, message: str) -> InvalidRequestError:
    """An invalid request naming the OpenAI parameter at fault (``error.param``)."""
    return InvalidRequestError(message, param)


# -- JSON shapes ----------------------------------------------------------------------


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _object(body: object, what: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise _invalid(what, f"{what} must be a JSON object, got {json_type(body)}")
    return body


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, f"{name} must be a number, got {json_type(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"{name} must be an integer, got {json_type(value)}")
    if not low <= value <= high:
        raise _invalid(name, f"{name} must be {low} to {high}, got {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"{name} must be true or false, got {json_type(value)}")
    return value


def _quoted(value: object) -> str:
    return quoted_input(value) if isinstance(value, str) else json_type(value)


def _text(value: object, param: str) -> str:
    """A string the protobuf message can hold: JSON may decode to lone surrogates."""
    if not isinstance(value, str):
        raise _invalid(param, f"{param} must be a string, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(
            param, f"{param} is not valid Unicode: it holds a lone surrogate such as \\ud800"
        ) from None
    return value


# -- what this server does not do -------------------------------------------------------


def _only_one(body: Mapping[str, Any], name: str, why: str) -> None:
    """``n`` and ``best_of``: absent, or the integer 1 (``true`` is not 1 here)."""
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(name, f"{name} must be an integer, got {json_type(value)}")
    if value != 1:
        raise _invalid(name, f"{name} must be 1: {why}")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    _only_one(body, "n", "this server returns one choice per request")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name) not in (None, 0.0):
            raise _invalid(
                name,
                f"{name} is not supported (only 0 is accepted); this server penalises "
                "repeats with repetition_penalty instead (> 1 discourages repeated tokens, "
                "as in Hugging Face transformers)",
            )
    if body.get("logit_bias"):
        raise _invalid("logit_bias", "logit_bias is not supported; leave it out")
    if body.get("top_logprobs"):
        raise _invalid("top_logprobs", "top_logprobs is not supported; leave it out")


def _refuse_unsupported_chat(body: Mapping[str, Any]) -> None:
    if body.get("logprobs"):
        raise _invalid("logprobs", "logprobs is not supported; leave it out or send false")


def _refuse_unsupported_completion(body: Mapping[str, Any]) -> None:
    if body.get("logprobs"):
        raise _invalid("logprobs", "logprobs is not supported; leave it out or send 0")
    if body.get("echo"):
        raise _invalid("echo", "echo is not supported; leave it out or send false")
    if body.get("suffix"):
        raise _invalid("suffix", "suffix (insertion) is not supported; leave it out")
    _only_one(body, "best_of", "this server returns one choice")


# -- tools and structured output -----------------------------------------------------------


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    """``tools`` (and the legacy ``functions``), their shapes checked."""
    specs = []
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _invalid(
                "tools",
                'tools must be an array of {"type": "function", "function": {"name", '
                f'"description", "parameters"}}}} objects, got {json_type(tools)}',
            )
        for index, item in enumerate(tools):
            where = f"tools[{index}]"
            tool = _object(item, where)
            if tool.get("type", "function") != "function":
                raise _invalid(
                    f"{where}.type",
                    f"{where}.type is {_quoted(tool.get('type'))}; only 'function' tools exist",
                )
            specs.append(_function(tool.get("function"), f"{where}.function"))
    functions = body.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise _invalid(
                "functions",
                f"functions must be an array of {{name, ...}} objects, got {json_type(functions)}",
            )
        specs.extend(_function(item, f"functions[{index}]") for index, item in enumerate(functions))
    return tuple(specs)


def _function(value: object, where: str) -> ToolSpec:
    function = _object(value, where)
    description = function.get("description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict):
        raise _invalid(
            f"{where}.parameters",
            f"{where}.parameters must be a JSON Schema object, got {json_type(parameters)}",
        )
    return ToolSpec(
        name=_text(function.get("name"), f"{where}.name"),
        description="" if description is None else _text(description, f"{where}.description"),
        parameters=_json_text(parameters),
    )


def _tool_choice(body: Mapping[str, Any]) -> tuple[str, str, str]:
    """(the parameter's name, "auto"/"none"/"required"/"function", the named function)."""
    name, choice = "tool_choice", body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:
        name, choice = "function_call", body.get("function_call")
    if choice is None or choice in ("none", "auto", "required"):
        return name, choice or "auto", ""
    if isinstance(choice, dict):
        # {"type": "function", "function": {"name": ...}}, or the legacy {"name": ...}
        named = choice.get("function", choice)
        if isinstance(named, dict) and isinstance(named.get("name"), str):
            return name, "function", _text(named["name"], f"{name}.function.name")
    raise _invalid(
        name,
        f"{name} must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}, got '
        f"{_quoted(choice)}",
    )


def _json_schema(body: Mapping[str, Any]) -> str | None:
    """``response_format``: None (text), "" (any JSON object) or a JSON Schema's text."""
    value = body.get("response_format")
    if value is None:
        return None
    response_format = _object(value, "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ""
    if kind != "json_schema":
        raise _invalid(
            "response_format",
            "response_format.type must be 'text', 'json_object' or 'json_schema', got "
            f"{_quoted(kind)}",
        )
    spec = _object(response_format.get("json_schema"), "response_format.json_schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _invalid(
            "response_format.json_schema.schema",
            "response_format.json_schema.schema must be a JSON Schema object, got "
            f"{json_type(schema)}",
        )
    return _json_text(schema)


# -- the shared parameters -----------------------------------------------------------------

# OpenAI's spelling of fields the front door names differently.
FIELD_NAMES = {"json_schema": "response_format"}


def _draft(body: Mapping[str, Any], request_id: str) -> RequestDraft:
    """The sampling parameters, checked for type here and for range by the front door."""
    _refuse_unsupported(body)
    max_name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    top_p = _number(body, "top_p")
    if top_p == 0:  # OpenAI reads 0 as greedy; this server's sampling needs (0, 1]
        raise _invalid("top_p", "top_p must be in (0, 1], got 0; for greedy send temperature 0")
    stop = body.get("stop")
    if isinstance(stop, str):
        stops: tuple[str, ...] = (_text(stop, "stop"),)
    elif isinstance(stop, list):
        stops = tuple(_text(item, f"stop[{i}]") for i, item in enumerate(stop))
    elif stop is None:
        stops = ()
    else:
        raise _invalid(
            "stop", f"stop must be a string or an array of strings, got {json_type(stop)}"
        )
    seed = _integer(body, "seed", *SEED_RANGE)
    model = body.get("model")
    return RequestDraft(
        request_id=request_id,
        model_id="" if model is None else _text(model, "model"),
        max_tokens=_integer(body, max_name, -INT32_MAX, INT32_MAX),
        # Left out: the model's default temperature (OpenAI's is 1, which the model's
        # falls back to); 0 is greedy.
        temperature=_number(body, "temperature"),
        top_p=top_p,
        stop=stops,
        seed=None if seed is None else seed % 2**64,
        # Extensions beyond OpenAI's parameters, under the names vLLM gives them.
        top_k=_integer(body, "top_k", 0, INT32_MAX),
        repetition_penalty=_number(body, "repetition_penalty"),
        names={**FIELD_NAMES, "max_tokens": max_name},
    )


def _stream_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None or not stream:
        return stream, False
    return stream, _boolean(_object(options, "stream_options"), "include_usage")


# -- requests --------------------------------------------------------------------------------


def chat_request(body: object, request_id: str) -> OpenAIRequest:
    """``POST /v1/chat/completions``: the conversation in ``messages``."""
    fields = _object(body, "the request body")
    _refuse_unsupported_chat(fields)
    turns = fields.get("messages")
    if not isinstance(turns, list) or not turns:
        raise _invalid(
            "messages",
            "messages must be a non-empty array of {role, content} objects, got "
            f"{json_type(turns) if turns != [] else 'an empty array'}",
        )
    choice_name, choice, tool_name = _tool_choice(fields)
    parallel = fields.get("parallel_tool_calls")
    draft = dataclasses.replace(
        _draft(fields, request_id),
        messages=tuple(_turn(item, f"messages[{index}]") for index, item in enumerate(turns)),
        tools=_tools(fields),
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=True if parallel is None else _boolean(fields, "parallel_tool_calls"),
        json_schema=_json_schema(fields),
    )
    draft = dataclasses.replace(draft, names={**draft.names, "tool_choice": choice_name})
    stream, include_usage = _stream_options(fields)
    return OpenAIRequest(draft, stream, include_usage)


def _turn(item: object, where: str) -> ChatTurn:
    turn = _object(item, where)
    role = _text(turn.get("role"), f"{where}.role")
    calls = turn.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise _invalid(
            f"{where}.tool_calls",
            f"{where}.tool_calls must be an array of tool calls, got {json_type(calls)}",
        )
    tool_call_id = turn.get("tool_call_id")
    name = turn.get("name")
    return ChatTurn(
        role=ROLE_ALIASES.get(role, role),
        content=_content(turn.get("content"), where),
        tool_calls=tuple(
            _tool_call(call, f"{where}.tool_calls[{index}]")
            for index, call in enumerate(calls or ())
        ),
        tool_call_id="" if tool_call_id is None else _text(tool_call_id, f"{where}.tool_call_id"),
        name="" if name is None or role != "tool" else _text(name, f"{where}.name"),
    )


def _tool_call(item: object, where: str) -> ToolCall:
    call = _object(item, where)
    function = _object(call.get("function"), f"{where}.function")
    arguments = function.get("arguments")
    if arguments is None or arguments == "":  # a call without arguments, as gRPC takes it
        arguments = "{}"
    elif isinstance(arguments, dict):  # some clients send the object itself
        arguments = _json_text(arguments)
    call_id = call.get("id")
    return ToolCall(
        id="" if call_id is None else _text(call_id, f"{where}.id"),
        name=_text(function.get("name"), f"{where}.function.name"),
        arguments=_text(arguments, f"{where}.function.arguments"),
    )


def _content(content: object, where: str) -> str:
    """A message's content: a string, null, or an array of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if not isinstance(content, list):
        raise _invalid(
            f"{where}.content",
            f"{where}.content must be a string or an array of text parts, got {json_type(content)}",
        )
    texts = []
    for index, item in enumerate(content):
        param = f"{where}.content[{index}]"
        part = _object(item, param)
        if part.get("type") != "text":
            raise _invalid(
                param,
                f"{param} has type {_quoted(part.get('type'))}; this server takes only "
                'text parts ({"type": "text", "text": "..."})',
            )
        texts.append(_text(part.get("text"), f"{param}.text"))
    return "".join(texts)


def completion_request(body: object, request_id: str) -> OpenAIRequest:
    """``POST /v1/completions``: raw text in ``prompt``, no chat template."""
    fields = _object(body, "the request body")
    _refuse_unsupported_completion(fields)
    draft = _draft(fields, request_id)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _invalid(
            "prompt",
            "prompt must be one string (or an array of exactly one string); token arrays and "
            "several prompts per request are not supported",
        )
    if prompt is None:
        raise _invalid("prompt", "prompt is required: send the text to continue")
    text = _text(prompt, "prompt")
    if not text:
        raise _invalid("prompt", "prompt is empty; send some text")
    stream, include_usage = _stream_options(fields)
    draft = dataclasses.replace(draft, prompt=text, apply_chat_template=False)
    return OpenAIRequest(draft, stream, include_usage)


# -- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseInfo:
    """What every response (and chunk) of one request repeats."""

    id: str
    created: int
    model: str
    # The model version (sha256-... or hub-id@commit) as OpenAI's system_fingerprint.
    fingerprint: str


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> JsonObject:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the prefix cache held."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _head(info: ResponseInfo, kind: str) -> JsonObject:
    return {
        "id": info.id,
        "object": kind,
        "created": info.created,
        "model": info.model,
        "system_fingerprint": info.fingerprint,
    }


def _tool_call_json(call: ToolCall) -> JsonObject:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _finish_reason(reason: FinishReason, called: bool) -> str:
    return "tool_calls" if finish_with_calls(reason, called) else FINISH_REASONS[reason]


def chat_completion(info: ResponseInfo, completion: Completion, reading: ToolReading) -> JsonObject:
    content, calls = read_tool_calls(reading, completion.text)
    message: JsonObject = {"role": "assistant", "content": content}
    if calls:
        message["content"] = content or None
        message["tool_calls"] = [_tool_call_json(call) for call in calls]
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": _finish_reason(completion.finish_reason, bool(calls)),
    }
    return {
        **_head(info, "chat.completion"),
        "choices": [choice],
        "usage": usage(
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.cached_prompt_tokens,
        ),
    }


def text_completion(info: ResponseInfo, completion: Completion) -> JsonObject:
    choice = {
        "index": 0,
        "text": completion.text,
        "logprobs": None,
        "finish_reason": FINISH_REASONS[completion.finish_reason],
    }
    return {
        **_head(info, "text_completion"),
        "choices": [choice],
        "usage": usage(
            completion.prompt_tokens,
            completion.completion_tokens,
            completion.cached_prompt_tokens,
        ),
    }


class Chunks:
    """The chunks of one streamed answer, as OpenAI sends them.

    Chat: a first chunk with the assistant role, one per piece of text or tool-call
    delta, a last one with ``finish_reason`` and an empty delta; completions: one per
    piece of text and a last one with ``finish_reason``. With ``include_usage`` every
    chunk has ``usage: null`` and one more, with no choices, carries the usage.

    With a tool-call format, the text goes through its parser: text before a call
    streams as content; a call streams as ``delta.tool_calls`` (its index, id and
    name, then its arguments), and the markup around it never reaches content.
    """

    def __init__(
        self, info: ResponseInfo, chat: bool, include_usage: bool, tools: ToolReading | None = None
    ) -> None:
        self._info = info
        self._chat = chat
        self._include_usage = include_usage
        self._parser = (
            stream_for(tools.format, tools.names) if chat and tools and tools.format else None
        )
        self._called = False

    def _chunk(self, choices: list[JsonObject]) -> JsonObject:
        kind = "chat.completion.chunk" if self._chat else "text_completion"
        chunk = {**_head(self._info, kind), "choices": choices}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, delta: JsonObject | None, finish_reason: str | None) -> JsonObject:
        if self._chat:
            return {
                "index": 0,
                "delta": delta or {},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        text = (delta or {}).get("content", "")
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[JsonObject]:
        if not self._chat:
            return []
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return [self._chunk([{**first, "finish_reason": None}])]

    def _delta(self, delta: ContentDelta | ToolCallDelta) -> JsonObject | None:
        if isinstance(delta, ContentDelta):
            return {"content": delta.text} if delta.text else None
        self._called = True
        call: JsonObject = {"index": delta.index}
        function: JsonObject = {"arguments": delta.arguments}
        if delta.id:
            call.update(id=delta.id, type="function")
        if delta.name:
            function["name"] = delta.name
        call["function"] = function
        return {"tool_calls": [call]}

    def _from(self, deltas: list[ContentDelta | ToolCallDelta]) -> list[JsonObject]:
        chunks = []
        for delta in deltas:
            body = self._delta(delta)
            if body is not None:
                chunks.append(self._chunk([self._choice(body, None)]))
        return chunks

    def text(self, piece: str) -> list[JsonObject]:
        if self._parser is None:
            return [self._chunk([self._choice({"content": piece}, None)])]
        return self._from(self._parser.feed(piece))

    def closing(self, end: StreamEnd) -> list[JsonObject]:
        chunks = self._from(self._parser.finish()) if self._parser is not None else []
        reason = _finish_reason(end.finish_reason, self._called)
        chunks.append(self._chunk([self._choice(None, reason)]))
        if self._include_usage:
            chunks.append(
                {
                    **self._chunk([]),
                    "usage": usage(
                        end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens
                    ),
                }
            )
        return chunks


def model_card(
    model_id: str, created: int, sampling_defaults: Mapping[str, float], max_tokens_cap: int
) -> JsonObject:
    """OpenAI's model object, the model's own sampling defaults (what a request that
    leaves temperature, top_p, top_k or repetition_penalty out gets) and the largest
    ``max_tokens`` this server takes (``--max-tokens-cap``), for a frontend's form."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "sampling_defaults": dict(sampling_defaults),
        "max_tokens_cap": max_tokens_cap,
    }


def encode_json(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse_event(value: object) -> bytes:
    """One server-sent event; JSON never holds a raw newline, so one data line is enough."""
    return b"data: " + encode_json(value) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
