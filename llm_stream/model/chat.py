"""Turning a request into the text the model reads: its chat template, or a plain
fallback for models that have none."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_stream.engine.types import ChatTurn
from llm_stream.errors import InvalidRequestError

# The fallback for a model without a chat template: one "Role: content" paragraph
# per message, then "Assistant:" for the model to continue. Documented in the README.
FALLBACK_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def plain_conversation(messages: Sequence[ChatTurn]) -> str:
    turns = [f"{FALLBACK_LABELS[m.role]}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def templated_conversation(tokenizer: Any, messages: Sequence[ChatTurn]) -> str:
    """The conversation in the model's chat template, with the assistant's turn opened."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as exc:  # templates raise jinja2 errors for shapes they refuse
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "refused"
        raise InvalidRequestError(
            f"the model's chat template cannot render this conversation: {message}"
        ) from None
    return str(text)
