"""Per-row sampling as a logits processor, so one padded batch can mix settings.

``generate`` runs greedy (argmax) and this processor, applied last, leaves greedy
rows as they are and, for sampled rows, draws the token with the row's own
``torch.Generator`` and masks every other logit. Each request thus gets its own
reproducible random stream (same seed, same output) even while other requests
sample concurrently on other threads, which a global ``torch.manual_seed``
could not give.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from llm_stream.engine.types import SamplingParams


@dataclass
class RowSampling:
    params: SamplingParams
    # Left-padding length of this row; padding is ignored by the repetition penalty.
    pad_length: int
    generator: torch.Generator | None


def make_row(params: SamplingParams, pad_length: int, device: torch.device) -> RowSampling:
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator.manual_seed(seed)
    return RowSampling(params=params, pad_length=pad_length, generator=generator)


class PerRowSampler(LogitsProcessor):
    """Repetition penalty and sampling, each row with its own settings and generator."""

    def __init__(self, rows: Sequence[RowSampling]) -> None:
        self._rows = list(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for i, row in enumerate(self._rows):
            out[i] = self._process_row(input_ids[i, row.pad_length :], out[i], row)
        return out  # type: ignore[return-value]  # FloatTensor is only a type alias

    @staticmethod
    def _process_row(ids: torch.Tensor, logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
        params = row.params
        if params.repetition_penalty != 1.0 and ids.numel() > 0:
            seen = logits.gather(0, ids)
            seen = torch.where(
                seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty
            )
            logits = logits.scatter(0, ids, seen)
        if row.generator is None:
            return logits
        logits = logits.float() / params.temperature
        if 0 < params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop tokens once the mass before them already reaches top_p (keep at least one).
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
            drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        choice = torch.multinomial(probs, 1, generator=row.generator)
        picked = torch.full_like(logits, float("-inf"))
        picked[choice] = 0.0
        return picked.to(logits.dtype)
