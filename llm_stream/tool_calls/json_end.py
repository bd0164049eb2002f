"""Where a JSON object or array ends, found as its text arrives piece by piece."""

from __future__ import annotations


class JsonEnd:
    """Scans a text that starts with ``{`` or ``[`` (and only grows at its end) for
    the end of that value; each call scans only what it has not seen yet."""

    def __init__(self) -> None:
        self._seen = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def end(self, text: str) -> int | None:
        """The index just past the value's last character, None while it is open."""
        for index in range(self._seen, len(text)):
            char = text[index]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    self._seen = index + 1
                    return index + 1
        self._seen = len(text)
        return None
