"""Which tool-call format a model writes, read from its chat template's text."""

from __future__ import annotations

import re

HERMES = "hermes"
MISTRAL = "mistral"
LLAMA3_JSON = "llama3_json"
# Not a model's format: the JSON array of calls a forced tool call is generated as,
# under guided decoding (``[{"name": ..., "arguments": {...}}, ...]``).
FORCED = "forced"

_TOOLS = re.compile(r"\btools\b")


def tool_format_of(chat_template: str | None) -> str | None:
    """``"hermes"`` (``<tool_call>``: Qwen2.5, Qwen3, Hermes 2/3), ``"mistral"``
    (``[TOOL_CALLS]``), ``"llama3_json"`` (Llama 3.1 to 3.3: a JSON object with
    ``"parameters"``, the ipython role, ``<|python_tag|>``); None for a template that
    takes no tools, or writes calls in a format we cannot read (its tools are then
    left out, so the model never writes calls nobody parses)."""
    if not chat_template or not _TOOLS.search(chat_template):
        return None
    if "<tool_call>" in chat_template:
        return HERMES
    if "[TOOL_CALLS]" in chat_template:
        return MISTRAL
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return LLAMA3_JSON
    if '"parameters"' in chat_template and "<|start_header_id|>" in chat_template:
        return LLAMA3_JSON
    return None
