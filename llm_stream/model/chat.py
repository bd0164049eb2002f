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


def plain_conversation(messages: Sequence[ChatTurn], continue_final: bool = False) -> str:
    """``continue_final``: the last (assistant) message is left open to carry on, its
    content right after "Assistant:" as the model would have generated it (no space
    added), so a resumed answer reads exactly as the cut one did."""
    turns = [f"{FALLBACK_LABELS[m.role]}: {m.content}" for m in messages]
    if continue_final:
        turns[-1] = f"Assistant:{messages[-1].content}"
        return "\n\n".join(turns)
    return "\n\n".join([*turns, "Assistant:"])


def templated_conversation(
    tokenizer: Any, messages: Sequence[ChatTurn], continue_final: bool = False
) -> str:
    """The conversation in the model's chat template, with the assistant's turn opened;
    ``continue_final``: the last (assistant) message is rendered open instead, so the
    model carries it on."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
        )
    except Exception as exc:  # templates raise jinja2 errors for shapes they refuse
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "refused"
        raise InvalidRequestError(
            f"the model's chat template cannot render this conversation: {message}"
        ) from None
    return str(text)
