"""Turning a request into the text the model reads: its chat template, or a plain
fallback for models that have none.

Tools reach the model through its template where the template takes them (it
writes calls in a format we can read: :func:`llm_stream.tool_calls.tool_format_of`),
with assistant calls and tool results in the OpenAI message shape templates expect.
Where it does not, calls and results become text the template accepts (a result is
a user turn naming the call it answers, an assistant's calls their JSON), and tools
are left out, unless the call is forced (guided decoding writes it): then a system
message describes them, so the model knows what it is filling in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from llm_stream.engine.types import ChatTurn, ToolCall, ToolSpec
from llm_stream.errors import InvalidRequestError
from llm_stream.tool_calls import LLAMA3_JSON, MISTRAL

# The fallback for a model without a chat template: one "Role: content" paragraph
# per message, then "Assistant:" for the model to continue. Documented in the README.
FALLBACK_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_template_text(tokenizer: Any) -> str | None:
    """The tokenizer's chat template; of several named ones, all of them (enough to
    tell which tool-call format the model writes)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(text) for text in template.values()) or None
    return template if isinstance(template, str) and template else None


def plain_conversation(
    messages: Sequence[ChatTurn],
    continue_final: bool = False,
    *,
    tools: Sequence[ToolSpec] = (),
    constrained: bool = False,
) -> str:
    """``continue_final``: the last (assistant) message is left open to carry on, its
    content right after "Assistant:" as the model would have generated it (no space
    added), so a resumed answer reads exactly as the cut one did. ``tools`` are
    described only when ``constrained`` (a forced call)."""
    turns = text_turns(messages, tools if constrained else ())
    lines = [f"{FALLBACK_LABELS[t.role]}: {t.content}" for t in turns]
    if continue_final:
        lines[-1] = f"Assistant:{turns[-1].content}"
        return "\n\n".join(lines)
    return "\n\n".join([*lines, "Assistant:"])


def templated_conversation(
    tokenizer: Any,
    messages: Sequence[ChatTurn],
    continue_final: bool = False,
    *,
    tools: Sequence[ToolSpec] = (),
    tool_format: str | None = None,
    constrained: bool = False,
) -> str:
    """The conversation in the model's chat template, with the assistant's turn opened;
    ``continue_final``: the last (assistant) message is rendered open instead, so the
    model carries it on. ``tool_format``: the model's (None: its template takes no
    tools); ``constrained``: the output is guided (a forced call, if ``tools``)."""
    extra: dict[str, Any] = {}
    if tool_format is not None:
        shaped = native_messages(messages, tool_format)
        if tools:
            extra["tools"] = [tool_json(tool) for tool in tools]
    else:
        turns = text_turns(messages, tools if constrained else ())
        shaped = [{"role": turn.role, "content": turn.content} for turn in turns]
    try:
        text = tokenizer.apply_chat_template(
            shaped,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **extra,
        )
    except Exception as exc:  # templates raise jinja2 errors for shapes they refuse
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "refused"
        raise InvalidRequestError(
            f"the model's chat template cannot render this conversation: {message}"
        ) from None
    return str(text)


# -- templates that take tools ------------------------------------------------------------


def tool_json(tool: ToolSpec) -> dict[str, Any]:
    """A tool as templates take it (an OpenAI ``tools`` entry)."""
    function = {
        "name": tool.name,
        "description": tool.description,
        "parameters": _json_value(tool.parameters),
    }
    return {"type": "function", "function": function}


def native_messages(messages: Sequence[ChatTurn], tool_format: str) -> list[dict[str, Any]]:
    """The messages in the OpenAI shape, with arguments as objects (Qwen's, Llama's and
    Mistral's templates write them with ``tojson``); Mistral's template wants call ids
    of 9 letters and digits; Llama 3's one call per assistant turn."""
    shaped: list[dict[str, Any]] = []
    for turn in messages:
        if turn.role == "tool":
            result: dict[str, Any] = {"role": "tool", "content": turn.content}
            result["tool_call_id"] = _call_id(turn.tool_call_id, tool_format)
            if turn.name:
                result["name"] = turn.name
            shaped.append(result)
        elif turn.tool_calls:
            groups = (
                [[c] for c in turn.tool_calls] if tool_format == LLAMA3_JSON else [turn.tool_calls]
            )
            for calls in groups:
                shaped.append(
                    {
                        "role": "assistant",
                        "content": turn.content,
                        "tool_calls": [_call_json(call, tool_format) for call in calls],
                    }
                )
        else:
            shaped.append({"role": turn.role, "content": turn.content})
    return shaped


def _call_json(call: ToolCall, tool_format: str) -> dict[str, Any]:
    function = {"name": call.name, "arguments": _json_value(call.arguments)}
    return {"id": _call_id(call.id, tool_format), "type": "function", "function": function}


def _call_id(call_id: str, tool_format: str) -> str:
    if tool_format != MISTRAL or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    # The same id maps to the same 9 characters in the call and in its result.
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # the front door checks arguments; keep text as text
        return text


# -- templates without tools, and the plain fallback --------------------------------------


def text_turns(messages: Sequence[ChatTurn], tools: Sequence[ToolSpec] = ()) -> list[ChatTurn]:
    """The conversation in system, user and assistant turns only: tool results (those
    in a row joined) as user turns, assistant calls as their JSON; ``tools`` described
    in the system message."""
    turns: list[ChatTurn] = []
    after_result = False
    for turn in messages:
        if turn.role == "tool":
            text = _result_text(turn)
            if after_result:
                turns[-1] = ChatTurn("user", f"{turns[-1].content}\n\n{text}")
            else:
                turns.append(ChatTurn("user", text))
            after_result = True
            continue
        after_result = False
        if turn.tool_calls:
            calls = calls_text(turn.tool_calls)
            turns.append(
                ChatTurn("assistant", f"{turn.content}\n{calls}" if turn.content else calls)
            )
        else:
            turns.append(ChatTurn(turn.role, turn.content))
    if tools:
        described = tools_text(tools)
        if turns and turns[0].role == "system":
            turns[0] = ChatTurn("system", f"{turns[0].content}\n\n{described}")
        else:
            turns.insert(0, ChatTurn("system", described))
    return turns


def _result_text(turn: ChatTurn) -> str:
    call = f"call {turn.tool_call_id}" if turn.tool_call_id else "a call"
    of = f" of {turn.name}" if turn.name else ""
    return f"Result{of} ({call}):\n{turn.content}"


def calls_text(calls: Sequence[ToolCall]) -> str:
    """Calls as the JSON array a forced call is written as."""
    return json.dumps(
        [{"name": c.name, "arguments": _json_value(c.arguments)} for c in calls],
        ensure_ascii=False,
    )


def tools_text(tools: Sequence[ToolSpec]) -> str:
    """The functions, for a model whose template cannot show them."""
    lines = [
        "You can call these functions. Call them with a JSON array of calls, "
        '[{"name": <function name>, "arguments": <arguments object>}]:'
    ]
    for tool in tools:
        spec = {
            "name": tool.name,
            "description": tool.description,
            "parameters": _json_value(tool.parameters),
        }
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)
