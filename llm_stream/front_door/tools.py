"""How a request's output is read for tool calls, the same on both faces."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from llm_stream.engine.types import FinishReason, ToolCall
from llm_stream.front_door.request import ValidRequest
from llm_stream.tool_calls import FORCED, parse_tool_calls

log = logging.getLogger(__name__)

# The response header (HTTP) and metadata key (gRPC) that says a request's tools
# were left out, and why.
TOOLS_IGNORED_HEADER = "x-llm-stream-tools"


@dataclass(frozen=True)
class ToolReading:
    """Which parser reads the output (None: it is plain text), and why the request's
    tools were left out, if they were."""

    format: str | None
    ignored: str | None = None
    # The functions offered: a call to any other is not a call (it stays text).
    names: tuple[str, ...] = ()

    @property
    def header(self) -> tuple[str, str] | None:
        return (TOOLS_IGNORED_HEADER, f"ignored: {self.ignored}") if self.ignored else None


def tool_reading(valid: ValidRequest, model_id: str, tool_format: str | None) -> ToolReading:
    """``tool_format``: how the model writes calls (from its chat template), None if
    its template takes no tools. Logs when tools are left out."""
    names = tuple(tool.name for tool in valid.generation.tools)
    if valid.tool_mode == "forced":
        return ToolReading(FORCED, names=names)
    if valid.tool_mode == "auto" and tool_format is not None:
        return ToolReading(tool_format, names=names)
    if not valid.tools_offered:
        return ToolReading(None)
    if valid.tool_mode == "none":
        why = valid.tools_left_out
    else:
        why = f"model {model_id}'s chat template takes no tools; the answer is text"
    log.info("%d tools left out of the prompt: %s", valid.tools_offered, why)
    return ToolReading(None, why)


def read_tool_calls(reading: ToolReading, text: str) -> tuple[str, list[ToolCall]]:
    """The text without the calls' markup, and the calls (none: the text as it is)."""
    if reading.format is None:
        return text, []
    return parse_tool_calls(reading.format, text, reading.names)


def finish_with_calls(finish_reason: FinishReason, called: bool) -> bool:
    """Whether an answer ends as tool calls: it made some and ended on its own."""
    return called and finish_reason in (FinishReason.END_OF_SEQUENCE, FinishReason.STOP_SEQUENCE)
