"""The HTTP face's streamed chunks for tool calls, read back by the openai SDK's own
stream accumulator: what an SDK user's ``stream.get_final_completion()`` gets."""

from __future__ import annotations

import json

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llm_stream.engine.types import FinishReason, StreamEnd
from llm_stream.front_door.tools import ToolReading
from llm_stream.http.openai_schema import Chunks, ResponseInfo

INFO = ResponseInfo(id="chatcmpl-1", created=0, model="m", fingerprint="sha256-x")
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
HERMES_ANSWER = f"Let me look that up.\n<tool_call>\n{CALL}\n</tool_call>"
MISTRAL_ANSWER = f"[TOOL_CALLS][{CALL}, {CALL.replace('Paris', 'Lima')}]"


def replay(reading: ToolReading, text: str, piece: int) -> tuple[ChatCompletion, list[dict]]:
    """The answer ``text`` streamed in ``piece``-character pieces, accumulated by the SDK."""
    chunks = Chunks(INFO, chat=True, include_usage=False, tools=reading)
    sent = [*chunks.opening()]
    for start in range(0, len(text), piece):
        sent.extend(chunks.text(text[start : start + piece]))
    sent.extend(chunks.closing(StreamEnd(FinishReason.END_OF_SEQUENCE, 5, 9)))
    state = ChatCompletionStreamState()
    for chunk in sent:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion(), sent


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_a_hermes_call_streams_as_tool_call_deltas(piece: int) -> None:
    completion, sent = replay(ToolReading("hermes", names=("get_weather",)), HERMES_ANSWER, piece)
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert (choice.message.content or "").strip() == "Let me look that up."
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in sent if c["choices"])
    assert "<tool_call>" not in streamed and "get_weather" not in streamed


def test_parallel_mistral_calls_keep_their_indexes() -> None:
    completion, _ = replay(ToolReading("mistral", names=("get_weather",)), MISTRAL_ANSWER, 2)
    calls = completion.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Lima"]
    assert len({c.id for c in calls}) == 2


def test_a_call_to_a_function_not_offered_stays_text() -> None:
    completion, _ = replay(ToolReading("hermes", names=("get_time",)), HERMES_ANSWER, 4)
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert choice.message.content == HERMES_ANSWER


def test_without_a_format_the_markup_is_plain_text() -> None:
    completion, _ = replay(ToolReading(None), HERMES_ANSWER, 5)
    assert completion.choices[0].message.content == HERMES_ANSWER
    assert completion.choices[0].finish_reason == "stop"
