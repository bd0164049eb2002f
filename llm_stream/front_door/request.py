"""One transport-neutral request, and the one place its values are checked.

A face fills a :class:`RequestDraft` from its wire format, checking only what is
its own (JSON types, protobuf shapes, parameters it cannot express), and
:func:`validate` checks the values and turns them into the engine's
:class:`~llm_stream.engine.types.GenerationRequest`. Messages name a field as the
client spelled it: the draft's ``names`` maps a neutral name (``top_p``) to the
face's (``config.top_p`` on gRPC; ``max_completion_tokens`` when an OpenAI body
used that), and the error's ``field`` carries it (OpenAI's ``param``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_stream.engine.types import (
    CHAT_ROLES,
    ChatTurn,
    GenerationRequest,
    JsonConstraint,
    SamplingParams,
    ToolSpec,
)
from llm_stream.errors import InvalidRequestError, InvalidSchemaError, quoted_input


@dataclass(frozen=True)
class RequestLimits:
    default_max_tokens: int = 256
    max_tokens_cap: int = 2048


MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_TOOLS = 128
# OpenAI's rule for function names, which chat templates and parsers rely on.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required", "function")


@dataclass(frozen=True)
class RequestDraft:
    """One generation as a face received it; None means "left out"."""

    request_id: str
    model_id: str = ""
    # Raw text to continue; or a conversation in ``messages``.
    prompt: str | None = None
    messages: tuple[ChatTurn, ...] = ()
    max_tokens: int | None = None
    # None: the model's own temperature (OpenAI's default); 0 is greedy.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    apply_chat_template: bool | None = None
    continue_final_message: bool = False
    tools: tuple[ToolSpec, ...] = ()
    # "auto", "none", "required", or "function" (the one named in ``tool_name``).
    tool_choice: str = "auto"
    tool_name: str = ""
    parallel_tool_calls: bool = True
    # Structured output: None free text, "" any JSON object, else a JSON Schema's text.
    json_schema: str | None = None
    # How the face spells a field, by its neutral name, for error messages.
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, neutral: str) -> str:
        return self.names.get(neutral, neutral)


@dataclass(frozen=True)
class ValidRequest:
    """A checked request: what the engine generates, and how its output is read."""

    generation: GenerationRequest
    # "none" (no tools), "auto" (the model may call one), "forced" (it must: the
    # output is a JSON array of calls, generated under guided decoding).
    tool_mode: str = "none"
    # How many tools the request offered (with tool_choice "none" too).
    tools_offered: int = 0
    # The field the generation's JSON constraint came from, as the client spelled it
    # (``response_format``, ``config.json_schema``, ``tools``); None without one.
    constraint_field: str | None = None
    # Why the request's tools were left out of the prompt, when the request said so
    # (tool_choice "none", or a response_format that leaves no room for a call).
    tools_left_out: str = ""


def blame_schema(exc: Exception, valid: ValidRequest | None) -> Exception:
    """``exc``, and a schema the grammar engine refused as an error about the field the
    client sent that schema in (the model layer that compiles it cannot know which)."""
    if isinstance(exc, InvalidSchemaError) and valid is not None and valid.constraint_field:
        return InvalidRequestError(f"{valid.constraint_field}: {exc}", valid.constraint_field)
    return exc


def validate(draft: RequestDraft, limits: RequestLimits) -> ValidRequest:
    """The draft checked; InvalidRequestError naming the field that is wrong."""
    messages = _conversation(draft)
    if not messages and not draft.prompt:
        raise InvalidRequestError("send a prompt, or a conversation in messages")
    tools = _tools(draft)
    tool_mode = _tool_mode(draft, tools)
    left_out = ""
    if tool_mode == "none" and tools:
        left_out = f"{draft.name('tool_choice')} is 'none'"
    elif tool_mode == "auto" and draft.json_schema is not None:
        # The answer must match that schema, which leaves no room for a call.
        tool_mode = "none"
        left_out = f"{draft.name('json_schema')} makes the answer JSON of its schema"
    constraint = _constraint(draft, tools, tool_mode)
    if draft.continue_final_message:
        _check_continuation(draft, messages, constraint)
    generation = GenerationRequest(
        request_id=draft.request_id,
        model_id=draft.model_id,
        prompt="" if messages else (draft.prompt or ""),
        messages=messages,
        sampling=_sampling(draft, limits),
        apply_chat_template=draft.apply_chat_template,
        continue_final_message=draft.continue_final_message,
        tools=() if tool_mode == "none" else tools,
        constraint=constraint,
    )
    source = "tools" if tool_mode == "forced" else "json_schema"
    return ValidRequest(
        generation,
        tool_mode,
        len(tools),
        constraint_field=None if constraint is None else draft.name(source),
        tools_left_out=left_out,
    )


# -- the conversation ----------------------------------------------------------------


def _conversation(draft: RequestDraft) -> tuple[ChatTurn, ...]:
    for index, turn in enumerate(draft.messages):
        where = f"messages[{index}]"
        if turn.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"{where}.role must be {', '.join(CHAT_ROLES[:-1])} or {CHAT_ROLES[-1]}, "
                f"got {quoted_input(turn.role, 40)}",
                f"{where}.role",
            )
        if turn.tool_calls and turn.role != "assistant":
            raise InvalidRequestError(
                f"{where} is a {turn.role} message with tool_calls; only assistant messages "
                "carry tool calls",
                f"{where}.tool_calls",
            )
        for number, call in enumerate(turn.tool_calls):
            _json_object(call.arguments, f"{where}.tool_calls[{number}].function.arguments")
    if draft.messages and not any(turn.content or turn.tool_calls for turn in draft.messages):
        raise InvalidRequestError(
            "the conversation is empty: every message's content is empty", "messages"
        )
    return draft.messages


def _check_continuation(
    draft: RequestDraft, messages: tuple[ChatTurn, ...], constraint: JsonConstraint | None
) -> None:
    name = draft.name("continue_final_message")
    if not messages or messages[-1].role != "assistant":
        raise InvalidRequestError(
            f"{name} carries on the conversation's last message, which must be an assistant "
            "message; end messages with one, or leave the flag unset",
            name,
        )
    if constraint is not None:
        raise InvalidRequestError(
            f"{name} cannot be combined with structured output or a forced tool call: the "
            "carried-on text would not start a JSON value; leave one of them out",
            name,
        )


# -- sampling ------------------------------------------------------------------------


def _finite(draft: RequestDraft, neutral: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        name = draft.name(neutral)
        raise InvalidRequestError(f"{name} must be a finite number, got {value}", name)
    return value


def _sampling(draft: RequestDraft, limits: RequestLimits) -> SamplingParams:
    unset = set()
    temperature = draft.temperature
    if temperature is None:
        unset.add("temperature")
    elif _finite(draft, "temperature", temperature) < 0:
        name = draft.name("temperature")
        raise InvalidRequestError(f"{name} must be >= 0 (0 is greedy), got {temperature:g}", name)
    max_tokens = draft.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens_cap:
        name, cap = draft.name("max_tokens"), limits.max_tokens_cap
        if max_tokens > cap:
            message = (
                f"{name} {max_tokens} is above this server's cap of {cap}; ask for at most {cap}"
            )
        else:
            message = f"{name} must be 1 to {cap} (this server's cap), got {max_tokens}"
        raise InvalidRequestError(message, name)
    top_p = draft.top_p
    if top_p is None:
        unset.add("top_p")
    elif not 0 < _finite(draft, "top_p", top_p) <= 1:
        name = draft.name("top_p")
        raise InvalidRequestError(f"{name} must be in (0, 1], got {top_p:g}", name)
    top_k = draft.top_k
    if top_k is None:
        unset.add("top_k")
    elif top_k < 0:
        name = draft.name("top_k")
        raise InvalidRequestError(f"{name} must be >= 0 (0 disables it), got {top_k}", name)
    penalty = draft.repetition_penalty
    if penalty is None:
        unset.add("repetition_penalty")
    elif _finite(draft, "repetition_penalty", penalty) <= 0:
        name = draft.name("repetition_penalty")
        raise InvalidRequestError(f"{name} must be > 0, got {penalty:g}", name)
    _check_stops(draft)
    return SamplingParams(
        max_tokens=max_tokens or limits.default_max_tokens,
        max_tokens_explicit=max_tokens is not None,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        seed=draft.seed,
        repetition_penalty=1.0 if penalty is None else penalty,
        stop=draft.stop,
        unset=frozenset(unset),
    )


def _check_stops(draft: RequestDraft) -> None:
    name = draft.name("stop")
    if len(draft.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(
            f"{name} has {len(draft.stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
            name,
        )
    for stop in draft.stop:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequestError(
                f"each {name} sequence must be 1 to {MAX_STOP_LENGTH} characters long", name
            )


# -- tools and structured output ---------------------------------------------------------


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{name} is not valid JSON: {exc}", name) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be a JSON object", name)
    return value


def _tools(draft: RequestDraft) -> tuple[ToolSpec, ...]:
    name = draft.name("tools")
    if len(draft.tools) > MAX_TOOLS:
        raise InvalidRequestError(
            f"{name} has {len(draft.tools)} functions; at most {MAX_TOOLS} are allowed", name
        )
    seen: set[str] = set()
    for index, tool in enumerate(draft.tools):
        where = f"{name}[{index}].function"
        if not TOOL_NAME.fullmatch(tool.name):
            raise InvalidRequestError(
                f"{where}.name must be 1 to 64 letters, digits, '_' or '-', got "
                f"{quoted_input(tool.name, 40)}",
                f"{where}.name",
            )
        if tool.name in seen:
            raise InvalidRequestError(
                f"{where}.name {tool.name!r} is given twice; function names must be unique",
                f"{where}.name",
            )
        seen.add(tool.name)
        _json_object(tool.parameters, f"{where}.parameters")
    return draft.tools


def _tool_mode(draft: RequestDraft, tools: tuple[ToolSpec, ...]) -> str:
    name = draft.name("tool_choice")
    choice = draft.tool_choice
    if choice not in TOOL_CHOICES:
        raise InvalidRequestError(
            f"{name} must be 'none', 'auto', 'required' or a named function, got "
            f"{quoted_input(choice, 40)}",
            name,
        )
    if choice in ("required", "function") and not tools:
        raise InvalidRequestError(
            f"{name} {'required' if choice == 'required' else 'naming a function'} needs "
            f"functions to call; send them in {draft.name('tools')}",
            name,
        )
    if choice == "function" and draft.tool_name not in {tool.name for tool in tools}:
        raise InvalidRequestError(
            f"{name} names the function {quoted_input(draft.tool_name, 64)}, which is not "
            f"among {draft.name('tools')}",
            name,
        )
    if choice in ("required", "function"):
        return "forced"
    return "auto" if tools and choice == "auto" else "none"


def forced_calls_schema(tools: tuple[ToolSpec, ...], parallel: bool) -> dict[str, Any]:
    """The JSON Schema of a forced answer: an array of ``{"name", "arguments"}`` calls,
    each naming one of ``tools`` with arguments matching its parameters.

    Each tool's parameters sit under the root's ``$defs``, their local references
    (``#/$defs/...``, ``#``) rewritten to point there: parameters made by pydantic
    and the SDKs built on it refer to their own root, which here is the array."""
    definitions: dict[str, Any] = {}
    calls = []
    for index, tool in enumerate(tools):
        key = f"tool{index}_{tool.name}"
        definitions[key] = _rebased(json.loads(tool.parameters), f"#/$defs/{key}")
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.name]},
                    "arguments": {"$ref": f"#/$defs/{key}"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
        "$defs": definitions,
    }
    if not parallel:
        schema["maxItems"] = 1
    return schema


# Keywords whose values are data, not schemas: a "$ref" key in them is not a reference.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` with each local ``$ref`` (``#`` or ``#/...``) moved under ``root``."""
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    if not isinstance(schema, dict):
        return schema
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            moved[key] = root + value[1:]
        elif key in _DATA_KEYWORDS:
            moved[key] = value
        else:
            moved[key] = _rebased(value, root)
    return moved


def _constraint(
    draft: RequestDraft, tools: tuple[ToolSpec, ...], tool_mode: str
) -> JsonConstraint | None:
    if tool_mode == "forced":
        if draft.tool_choice == "function":
            tools = tuple(tool for tool in tools if tool.name == draft.tool_name)
        schema = forced_calls_schema(tools, draft.parallel_tool_calls)
        return JsonConstraint(json.dumps(schema, ensure_ascii=False))
    if draft.json_schema is None:
        return None
    if draft.json_schema:
        _json_object(draft.json_schema, draft.name("json_schema"))
    return JsonConstraint(draft.json_schema)
