"""Turns generated token ids into per-token text deltas for one sequence.

Used by streaming and batch generation alike, so StreamPredict's tokens always
concatenate to exactly the text Predict and BatchPredict return.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm_stream.engine.types import FinishReason
from llm_stream.model.detokenizer import Decoder, IncrementalDetokenizer
from llm_stream.model.stop_sequences import StopSequenceFilter


class TextAssembler:
    def __init__(
        self,
        decoder: Decoder,
        prompt_ids: Sequence[int],
        eos_token_ids: frozenset[int],
        max_tokens: int,
        stops: Sequence[str],
    ) -> None:
        self._detok = IncrementalDetokenizer(decoder, prompt_ids)
        self._stops = StopSequenceFilter(stops)
        self._eos = eos_token_ids
        self._max_tokens = max_tokens
        self.count = 0
        self.finish_reason: FinishReason | None = None
        self.parts: list[str] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, token_id: int) -> str:
        """Account one generated token; return the text it adds.

        The token that ends generation (end-of-sequence, the last allowed one, or
        the one completing a stop sequence) also releases any held-back text.
        """
        if self.done:
            return ""
        self.count += 1
        if token_id in self._eos:
            self.finish_reason = FinishReason.END_OF_SEQUENCE
            delta = self._stops.feed(self._detok.flush()) + self._stops.flush()
        else:
            delta = self._stops.feed(self._detok.add(token_id))
            if self._stops.matched:
                self.finish_reason = FinishReason.STOP_SEQUENCE
            elif self.count >= self._max_tokens:
                self.finish_reason = FinishReason.LENGTH
                delta += self._stops.feed(self._detok.flush())
                delta += "" if self._stops.matched else self._stops.flush()
                if self._stops.matched:
                    self.finish_reason = FinishReason.STOP_SEQUENCE
        self.parts.append(delta)
        return delta
