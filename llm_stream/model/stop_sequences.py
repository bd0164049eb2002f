"""Stop sequences over streamed text: the stop text is never emitted.

Text that could still turn into a stop sequence is held back until it either
completes one (generation ends, held text dropped) or cannot any more.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopSequenceFilter:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.matched = False

    def feed(self, text: str) -> str:
        """Add newly decoded text; return what may be emitted now."""
        if not self._stops or self.matched:
            return "" if self.matched else text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.matched = True
            emitted, self._pending = self._pending[:cut], ""
            return emitted
        keep = self._longest_stop_prefix_suffix()
        emitted = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return emitted

    def flush(self) -> str:
        """Release held text at the end of generation."""
        emitted, self._pending = ("" if self.matched else self._pending), ""
        return emitted

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest suffix of pending text that begins some stop sequence."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:size]):
                    best = size
                    break
        return best
