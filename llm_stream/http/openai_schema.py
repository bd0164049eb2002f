"""OpenAI request bodies -> the contract's ``PredictRequest``; results -> OpenAI JSON.

A body is checked here only for what is OpenAI's own: JSON shapes and types,
parameters this server cannot honour (``n`` > 1, ``logprobs``, ``tools``, non-zero
``frequency_penalty``...), which are refused by name rather than ignored. The
values themselves (ranges, stop sequences, roles, an empty conversation) are then
checked by the gRPC side's :func:`llm_stream.protocol.convert.to_generation_request`,
so both ports accept and refuse the same requests. Fields this module does not
name (``user``, ``metadata``, ``store``...) are ignored, as chat UIs send many.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llm_stream.engine.types import Completion, FinishReason, StreamEnd
from llm_stream.errors import InvalidRequestError, quoted_input
from llm_stream.http.errors import ParamError
from llm_stream.proto.inference.v1 import inference_pb2 as pb
from llm_stream.protocol.convert import PROMPT_FEATURE

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
    """A body turned into the contract's message, plus how to answer it."""

    message: pb.PredictRequest
    stream: bool
    include_usage: bool
    # Why the request's tools were left out (None: it sent none). This server makes
    # no tool calls yet; a chat UI that attaches tools to every request still gets
    # its answer, as text.
    tools_ignored: str | None = None


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
        raise ParamError(what, f"{what} must be a JSON object, got {json_type(body)}")
    return body


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(name, f"{name} must be a number, got {json_type(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {json_type(value)}")
    if not low <= value <= high:
        raise ParamError(name, f"{name} must be {low} to {high}, got {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {json_type(value)}")
    return value


def _quoted(value: object) -> str:
    return quoted_input(value) if isinstance(value, str) else json_type(value)


def _text(value: object, param: str) -> str:
    """A string the protobuf message can hold: JSON may decode to lone surrogates."""
    if not isinstance(value, str):
        raise ParamError(param, f"{param} must be a string, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(
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
        raise ParamError(name, f"{name} must be an integer, got {json_type(value)}")
    if value != 1:
        raise ParamError(name, f"{name} must be 1: {why}")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    _only_one(body, "n", "this server returns one choice per request")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name) not in (None, 0.0):
            raise ParamError(
                name,
                f"{name} is not supported (only 0 is accepted); this server penalises "
                "repeats with repetition_penalty instead (> 1 discourages repeated tokens, "
                "as in Hugging Face transformers)",
            )
    if body.get("logit_bias"):
        raise ParamError("logit_bias", "logit_bias is not supported; leave it out")
    if body.get("top_logprobs"):
        raise ParamError("top_logprobs", "top_logprobs is not supported; leave it out")


def _refuse_unsupported_chat(body: Mapping[str, Any]) -> None:
    if body.get("logprobs"):
        raise ParamError("logprobs", "logprobs is not supported; leave it out or send false")
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            raise ParamError(
                "response_format",
                'response_format is not supported beyond {"type": "text"} (no JSON mode)',
            )


def _refuse_unsupported_completion(body: Mapping[str, Any]) -> None:
    if body.get("logprobs"):
        raise ParamError("logprobs", "logprobs is not supported; leave it out or send 0")
    if body.get("echo"):
        raise ParamError("echo", "echo is not supported; leave it out or send false")
    if body.get("suffix"):
        raise ParamError("suffix", "suffix (insertion) is not supported; leave it out")
    _only_one(body, "best_of", "this server returns one choice")


# -- tools ---------------------------------------------------------------------------------

TOOLS_IGNORED_HEADER = "x-llm-stream-tools"


def _function_names(body: Mapping[str, Any]) -> list[str]:
    """The names in ``tools`` (and the legacy ``functions``), their shapes checked."""
    names = []
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise ParamError(
                "tools",
                'tools must be an array of {"type": "function", "function": {"name": ...}} '
                f"objects, got {json_type(tools)}",
            )
        for index, item in enumerate(tools):
            where = f"tools[{index}]"
            tool = _object(item, where)
            if tool.get("type", "function") != "function":
                raise ParamError(
                    f"{where}.type",
                    f"{where}.type is {_quoted(tool.get('type'))}; only 'function' tools exist",
                )
            function = _object(tool.get("function"), f"{where}.function")
            names.append(_text(function.get("name"), f"{where}.function.name"))
    functions = body.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise ParamError(
                "functions",
                f"functions must be an array of {{name, ...}} objects, got {json_type(functions)}",
            )
        for index, item in enumerate(functions):
            names.append(
                _text(_object(item, f"functions[{index}]").get("name"), f"functions[{index}].name")
            )
    return names


def _tools_ignored(body: Mapping[str, Any]) -> str | None:
    """Checks ``tools``, ``functions``, ``tool_choice``, ``function_call`` and
    ``parallel_tool_calls``; returns why the tools are left out (None: none sent).

    A request may offer tools and let the model choose (``auto``, the default) or
    forbid calls (``none``): both get a text answer. A request that demands a call
    (``required``, or a named function) is refused: a text answer would break it.
    """
    names = _function_names(body)
    _boolean(body, "parallel_tool_calls")
    name, choice = "tool_choice", body.get("tool_choice")
    if choice is None and body.get("function_call") is not None:
        name, choice = "function_call", body.get("function_call")
    if choice is not None and choice not in ("none", "auto"):
        if choice != "required" and not isinstance(choice, dict):
            raise ParamError(
                name,
                f"{name} must be 'none', 'auto', 'required' or a named function, got "
                f"{_quoted(choice)}",
            )
        demand = "'required'" if choice == "required" else "naming a function"
        raise ParamError(
            name,
            f"{name} {demand} demands a tool call, and this server does not make tool calls "
            "yet; send 'auto' or 'none' (the answer is then text), or leave tools out",
        )
    if not names:
        return None
    if choice == "none":
        return f"{name} is 'none'"
    return "this server does not make tool calls yet; the answer is text"


# -- the shared parameters -----------------------------------------------------------------


def _config(body: Mapping[str, Any], config: pb.InferenceConfig, max_tokens_cap: int) -> None:
    """The sampling parameters, checked for type here and for range by the contract."""
    name = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _integer(body, name, -INT32_MAX, INT32_MAX)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ParamError(
                name, f"{name} must be 1 to {max_tokens_cap} (this server's cap), got {max_tokens}"
            )
        if max_tokens > max_tokens_cap:
            raise ParamError(
                name,
                f"{name} {max_tokens} is above this server's cap of {max_tokens_cap}; "
                f"ask for at most {max_tokens_cap}",
            )
        config.max_tokens = max_tokens
    temperature = _number(body, "temperature")
    # Left out: the model's default temperature (OpenAI's is 1, which the model's
    # falls back to); 0 is greedy.
    if temperature is None:
        config.use_model_temperature = True
    else:
        config.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None:
        if not 0 < top_p <= 1:  # the contract reads 0 as "unset", OpenAI as "greedy"
            raise ParamError("top_p", f"top_p must be in (0, 1], got {top_p:g}")
        config.top_p = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        config.stop.append(_text(stop, "stop"))
    elif isinstance(stop, list):
        config.stop.extend(_text(item, f"stop[{i}]") for i, item in enumerate(stop))
    elif stop is not None:
        raise ParamError(
            "stop", f"stop must be a string or an array of strings, got {json_type(stop)}"
        )
    seed = _integer(body, "seed", *SEED_RANGE)
    if seed is not None:
        config.seed = seed % 2**64
    # Extensions beyond OpenAI's parameters, under the names vLLM gives them.
    top_k = _integer(body, "top_k", 0, INT32_MAX)
    if top_k is not None:
        config.top_k = top_k
    penalty = _number(body, "repetition_penalty")
    if penalty is not None:
        if penalty <= 0:
            raise ParamError(
                "repetition_penalty", f"repetition_penalty must be > 0, got {penalty:g}"
            )
        config.repetition_penalty = penalty


def _stream_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is None or not stream:
        return stream, False
    return stream, _boolean(_object(options, "stream_options"), "include_usage")


def _message(body: Mapping[str, Any], max_tokens_cap: int) -> pb.PredictRequest:
    message = pb.PredictRequest()
    model = body.get("model")
    if model is not None:
        message.model_id = _text(model, "model")
    _refuse_unsupported(body)
    _config(body, message.config, max_tokens_cap)
    return message


# -- requests --------------------------------------------------------------------------------


def chat_request(body: object, max_tokens_cap: int) -> OpenAIRequest:
    """``POST /v1/chat/completions``: the conversation in ``messages``."""
    fields = _object(body, "the request body")
    _refuse_unsupported_chat(fields)
    tools_ignored = _tools_ignored(fields)
    message = _message(fields, max_tokens_cap)
    turns = fields.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ParamError(
            "messages",
            "messages must be a non-empty array of {role, content} objects, got "
            f"{json_type(turns) if turns != [] else 'an empty array'}",
        )
    for index, item in enumerate(turns):
        where = f"messages[{index}]"
        turn = _object(item, where)
        if turn.get("tool_calls"):
            raise ParamError(f"{where}.tool_calls", "tool calls are not supported")
        role = _text(turn.get("role"), f"{where}.role")
        message.messages.add(
            role=ROLE_ALIASES.get(role, role), content=_content(turn.get("content"), where)
        )
    stream, include_usage = _stream_options(fields)
    return OpenAIRequest(message, stream, include_usage, tools_ignored)


def _content(content: object, where: str) -> str:
    """A message's content: a string, null, or an array of text parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _text(content, f"{where}.content")
    if not isinstance(content, list):
        raise ParamError(
            f"{where}.content",
            f"{where}.content must be a string or an array of text parts, got {json_type(content)}",
        )
    texts = []
    for index, item in enumerate(content):
        param = f"{where}.content[{index}]"
        part = _object(item, param)
        if part.get("type") != "text":
            raise ParamError(
                param,
                f"{param} has type {_quoted(part.get('type'))}; this server takes only "
                'text parts ({"type": "text", "text": "..."})',
            )
        texts.append(_text(part.get("text"), f"{param}.text"))
    return "".join(texts)


def completion_request(body: object, max_tokens_cap: int) -> OpenAIRequest:
    """``POST /v1/completions``: raw text in ``prompt``, no chat template."""
    fields = _object(body, "the request body")
    _refuse_unsupported_completion(fields)
    message = _message(fields, max_tokens_cap)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise ParamError(
            "prompt",
            "prompt must be one string (or an array of exactly one string); token arrays and "
            "several prompts per request are not supported",
        )
    if prompt is None:
        raise ParamError("prompt", "prompt is required: send the text to continue")
    text = _text(prompt, "prompt")
    if not text:
        raise ParamError("prompt", "prompt is empty; send some text")
    message.features[PROMPT_FEATURE].string_value = text
    message.config.apply_chat_template = False
    stream, include_usage = _stream_options(fields)
    return OpenAIRequest(message, stream, include_usage)


def in_openai_terms(exc: InvalidRequestError) -> InvalidRequestError:
    """A contract check's error, worded for an OpenAI client.

    The contract names its fields ``config.top_p``, ``messages[0].role``...; the
    OpenAI body calls the first ``top_p``, so "config." is dropped and the field
    becomes the error's ``param``. A message in any other shape is kept as it is.
    """
    message = str(exc)
    field = re.search(r"\bconfig\.(\w+)", message)
    if field:
        return ParamError(field.group(1), message.replace("config.", ""))
    turn = re.match(r"messages\[\d+\]\.\w+", message)
    if turn:
        return ParamError(turn.group(0), message)
    return exc


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


def chat_completion(info: ResponseInfo, completion: Completion) -> JsonObject:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text},
        "logprobs": None,
        "finish_reason": FINISH_REASONS[completion.finish_reason],
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

    Chat: a first chunk with the assistant role, one per piece of text, a last one
    with ``finish_reason`` and an empty delta; completions: one per piece of text
    and a last one with ``finish_reason``. With ``include_usage`` every chunk has
    ``usage: null`` and one more, with no choices, carries the usage.
    """

    def __init__(self, info: ResponseInfo, chat: bool, include_usage: bool) -> None:
        self._info = info
        self._chat = chat
        self._include_usage = include_usage

    def _chunk(self, choices: list[JsonObject]) -> JsonObject:
        kind = "chat.completion.chunk" if self._chat else "text_completion"
        chunk = {**_head(self._info, kind), "choices": choices}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None) -> JsonObject:
        if self._chat:
            delta: JsonObject = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def opening(self) -> list[JsonObject]:
        if not self._chat:
            return []
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return [self._chunk([{**first, "finish_reason": None}])]

    def text(self, piece: str) -> JsonObject:
        return self._chunk([self._choice(piece, None)])

    def closing(self, end: StreamEnd) -> list[JsonObject]:
        chunks = [self._chunk([self._choice(None, FINISH_REASONS[end.finish_reason])])]
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
