"""Reading calls out of the JSON a model wrote, leniently but never wrongly."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

# A call read from the text: its function's name and its arguments (a JSON object's text).
ParsedCall = tuple[str, str]


def calls_in(json_text: str, names: Collection[str] | None) -> list[ParsedCall] | None:
    """The calls in ``json_text``: one call object or a non-empty array of them, each
    ``{"name": ..., "arguments": {...}}`` (or Llama's ``"parameters"``, or the OpenAI
    shape ``{"function": {...}}``). None when it is anything else, or names a function
    outside ``names`` (when given): the text is then content, not calls."""
    try:
        value = json.loads(json_text)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _call(item: Any, names: Collection[str] | None) -> ParsedCall | None:
    if isinstance(item, dict) and isinstance(item.get("function"), dict):
        item = item["function"]
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    # Required: an object with a "name" alone is too often just data.
    arguments = item.get("arguments", item.get("parameters"))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)
