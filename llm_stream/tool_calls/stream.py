"""Separating tool calls from content in a model's output, as it streams.

One state machine serves every format; a :class:`Syntax` says what opens a call
(a marker such as ``<tool_call>``, or bare JSON where a format allows it), what
closes it (an end marker, or the end of its JSON value), and what may sit between
calls. Text outside calls streams as content as soon as it cannot be part of a
marker; a call is emitted once it is whole and valid. A call that is not (bad
JSON, an unknown function, cut off at the end) is given back as content, exactly
as the model wrote it: a parser never raises on what a model writes.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from llm_stream.engine.types import ToolCall
from llm_stream.tool_calls.calls import calls_in
from llm_stream.tool_calls.deltas import (
    ContentDelta,
    Delta,
    ToolCallDelta,
    assembled,
    merged,
    new_call_id,
)
from llm_stream.tool_calls.detect import FORCED, HERMES, LLAMA3_JSON, MISTRAL
from llm_stream.tool_calls.json_end import JsonEnd


@dataclass(frozen=True)
class Syntax:
    """How one format writes calls."""

    # Texts that open a call anywhere in the output.
    markers: tuple[str, ...] = ()
    # The text that closes a call opened by a marker; "": the end of its JSON value.
    end: str = ""
    # JSON that is a call without any marker, at the start of the output or right
    # after a call: how it begins once whitespace is removed (e.g. '[{"'); "": none.
    bare: str = ""
    # Characters dropped between two calls, besides whitespace.
    separators: str = ""


SYNTAXES: dict[str, Syntax] = {
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call>, once per call.
    HERMES: Syntax(markers=("<tool_call>",), end="</tool_call>"),
    # [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]; the marker is a special
    # token, which a detokenizer skipping special tokens drops: then the array is bare.
    MISTRAL: Syntax(markers=("[TOOL_CALLS]",), bare='[{"'),
    # {"name": ..., "parameters": {...}}, maybe after <|python_tag|>, several split by ";".
    LLAMA3_JSON: Syntax(markers=("<|python_tag|>",), bare='{"', separators=";"),
    # The whole output is the array of calls.
    FORCED: Syntax(bare='[{"'),
}

_SPACE = re.compile(r"\s+")


class ToolCallStream:
    """Feed it the output as it comes (``feed``), then ``finish`` at the end; each
    returns the deltas that became certain. ``names``: the functions offered, when
    known; a call to any other is content."""

    def __init__(self, syntax: Syntax, names: Collection[str] | None = None) -> None:
        self._syntax = syntax
        self._names = frozenset(names) if names is not None else None
        self._pending = ""  # text not yet given out: held back, or a call being read
        self._in_call = False
        self._opener = ""  # the marker that opened the call being read ("" when bare)
        self._gap = ""  # whitespace dropped before that call, given back if it is none
        self._json_end = JsonEnd()
        self._calls = 0
        # Only whitespace (and separators) since the start or the last call: where
        # bare JSON may open a call.
        self._leading = True
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._pending += text
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        """The rest, the output having ended: an open call becomes content."""
        return self._run(final=True)

    def _run(self, final: bool) -> list[Delta]:
        while self._read_call(final) if self._in_call else self._read_text(final):
            pass
        out, self._out = merged(self._out), []
        return out

    # -- outside calls -----------------------------------------------------------

    def _gap_length(self, text: str) -> int:
        between = self._syntax.separators if self._calls else ""
        length = 0
        while length < len(text) and (text[length].isspace() or text[length] in between):
            length += 1
        return length

    def _read_text(self, final: bool) -> bool:
        """Gives out content; True when a call opened (read it next)."""
        text = self._pending
        if self._leading and self._syntax.bare:
            gap = self._gap_length(text)
            start = _SPACE.sub("", text[gap : gap + 64])
            bare = self._syntax.bare
            if start.startswith(bare):
                self._open("", text[:gap], text[gap:])
                return True
            if bare.startswith(start) and not final:
                return False  # only whitespace, or the start of a bare call so far
        found = [(text.find(m), m) for m in self._syntax.markers if m in text]
        if found:
            at, marker = min(found)
            before = text[:at]
            kept = len(before.rstrip())
            self._content(before[:kept])
            self._open(marker, before[kept:], text[at + len(marker) :])
            return True
        if final:
            self._content(text if not self._calls else text[: len(text.rstrip())])
            self._pending = ""
            return False
        held = len(text) - _marker_prefix(text, self._syntax.markers)
        kept = len(text[:held].rstrip())
        self._content(text[:kept])
        self._pending = text[kept:]
        return False

    def _content(self, text: str) -> None:
        if not text:
            return
        self._out.append(ContentDelta(text))
        if len(text) > self._gap_length(text):
            self._leading = False

    def _open(self, marker: str, gap: str, body: str) -> None:
        self._in_call, self._opener, self._gap, self._pending = True, marker, gap, body
        self._json_end = JsonEnd()

    # -- inside a call -----------------------------------------------------------

    def _read_call(self, final: bool) -> bool:
        """True when the call is over (read on after it)."""
        body = self._pending
        if self._syntax.end and self._opener:
            at = body.find(self._syntax.end)
            if at >= 0:
                self._close(
                    body[:at],
                    body[: at + len(self._syntax.end)],
                    body[at + len(self._syntax.end) :],
                )
                return True
            if final:  # a whole call without its end marker still counts
                inner = body[: len(body) - _marker_prefix(body, (self._syntax.end,))]
                self._close(inner, body, "")
            return final
        value = body.lstrip()
        if not value:
            if final:
                self._close("", body, "")
            return final
        if value[0] not in "{[":
            self._close("", "", body)  # no JSON after the marker: it was text
            return True
        end = self._json_end.end(value)
        if end is None:
            if final:
                self._close("", body, "")
            return final
        skipped = len(body) - len(value)
        self._close(value[:end], body[: skipped + end], value[end:])
        return True

    def _close(self, json_text: str, raw: str, rest: str) -> None:
        """The call read: ``json_text`` its JSON, ``raw`` all it took after the opener."""
        calls = calls_in(json_text, self._names) if json_text.strip() else None
        self._in_call, self._pending = False, rest
        if calls is None:
            self._content(self._gap + self._opener + raw)
            return
        for name, arguments in calls:
            self._out.append(ToolCallDelta(self._calls, new_call_id(), name, ""))
            self._out.append(ToolCallDelta(self._calls, arguments=arguments))
            self._calls += 1
        self._leading = True


def _marker_prefix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that could begin a marker."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest


def stream_for(tool_format: str, names: Collection[str] | None = None) -> ToolCallStream:
    """A parser for one output written in ``tool_format`` (see ``SYNTAXES``)."""
    try:
        syntax = SYNTAXES[tool_format]
    except KeyError:
        raise ValueError(f"unknown tool-call format {tool_format!r}") from None
    return ToolCallStream(syntax, names)


def parse_tool_calls(
    tool_format: str, text: str, names: Collection[str] | None = None
) -> tuple[str, list[ToolCall]]:
    """A whole output: its content (the text without the calls) and its calls."""
    stream = stream_for(tool_format, names)
    return assembled([*stream.feed(text), *stream.finish()])
