"""Incremental detokenisation that is correct to the byte.

Text is the difference between two decodes of a sliding window of ids (the
approach TGI uses): decoding a window that starts a few tokens back keeps the
leading spaces SentencePiece drops at the start of a decode, and text ending in
U+FFFD (an incomplete UTF-8 sequence, e.g. half an emoji) is held back until the
next token completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context for the first generated token.
CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int]) -> None:
        self._decoder = decoder
        self._ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the text it completes ('' while held back)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of generation.

        A character cut in half by the end (max_tokens reached mid-emoji) is
        dropped rather than sent as U+FFFD: the text stays valid and is a prefix
        of what the model was writing.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        tail = new_text[len(prefix_text) :] if new_text.startswith(prefix_text) else ""
        return tail.rstrip(REPLACEMENT_CHAR)
