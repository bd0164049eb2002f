"""Tool calls in a model's output: which format a model writes (from its chat
template), and parsers that split its output into content and calls, streamed
(:func:`stream_for`) or whole (:func:`parse_tool_calls`). Pure Python.

Formats: ``"hermes"``, ``"mistral"``, ``"llama3_json"`` (see :func:`tool_format_of`),
and ``"forced"``: the JSON array ``[{"name": ..., "arguments": {...}}, ...]`` that a
forced tool call (tool_choice "required" or a named function) is generated as.
"""

from llm_stream.tool_calls.deltas import ContentDelta, Delta, ToolCallDelta, new_call_id
from llm_stream.tool_calls.detect import FORCED, HERMES, LLAMA3_JSON, MISTRAL, tool_format_of
from llm_stream.tool_calls.stream import (
    SYNTAXES,
    Syntax,
    ToolCallStream,
    parse_tool_calls,
    stream_for,
)

__all__ = [
    "FORCED",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "SYNTAXES",
    "ContentDelta",
    "Delta",
    "Syntax",
    "ToolCallDelta",
    "ToolCallStream",
    "new_call_id",
    "parse_tool_calls",
    "stream_for",
    "tool_format_of",
]
