"""What a tool-call parser hands the faces: pieces of content and of calls."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from llm_stream.engine.types import ToolCall


@dataclass(frozen=True)
class ContentDelta:
    """Text of the answer itself, to stream as ``content``."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of call number ``index``: its first delta has the id and the name (and
    arguments ""), the next ones add to its arguments (a JSON object's text)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


Delta = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    """An OpenAI-style call id: ``call_`` and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


def merged(deltas: Iterable[Delta]) -> list[Delta]:
    """``deltas`` with neighbouring content joined and empty content dropped."""
    out: list[Delta] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            if not delta.text:
                continue
            if out and isinstance(out[-1], ContentDelta):
                out[-1] = ContentDelta(out[-1].text + delta.text)
                continue
        out.append(delta)
    return out


def assembled(deltas: Iterable[Delta]) -> tuple[str, list[ToolCall]]:
    """The content and the whole calls that ``deltas`` spell out."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
            continue
        call = calls.setdefault(delta.index, ["", "", ""])
        call[0] = call[0] or delta.id
        call[1] = call[1] or delta.name
        call[2] += delta.arguments
    return "".join(content), [ToolCall(*calls[index]) for index in sorted(calls)]
