"""Next-token choice for a whole batch, each row with its own settings and seed.

Greedy rows take the argmax of the batch in one call and skip sampling. Sampled
rows are handled together: temperature, then top-k (taking the top candidates
once for all rows), then top-p over those candidates, then one draw per row by
inverting the cumulative distribution with a single uniform number from the
row's own ``torch.Generator``. Drawing one number per row instead of noise over
the whole vocabulary keeps sampling cheap at 64 rows, and because a row's
random stream never depends on other rows, the same seed gives the same text
whatever else is in the batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llm_stream.engine.types import SamplingParams

_MIN_TEMPERATURE = 1e-4


@dataclass
class RowSampler:
    """One sequence's sampling settings, generator and the ids its penalty looks at."""

    params: SamplingParams
    generator: torch.Generator | None
    # Prompt and generated ids, for the repetition penalty (kept only when it applies).
    seen: list[int] = field(default_factory=list)

    def record(self, token_id: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.append(token_id)


def make_row_sampler(
    params: SamplingParams, prompt_ids: Sequence[int], device: torch.device
) -> RowSampler:
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    seen = list(prompt_ids) if params.repetition_penalty != 1.0 else []
    return RowSampler(params, generator, seen)


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Divide positive (multiply negative) logits of ids a row has seen, per row."""
    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not penalised:
        return logits
    logits = logits.clone()
    for i in penalised:
        ids = torch.tensor(rows[i].seen, dtype=torch.long, device=logits.device)
        if ids.numel() == 0:
            continue
        penalty = rows[i].params.repetition_penalty
        seen = logits[i].gather(0, ids)
        logits[i].scatter_(0, ids, torch.where(seen < 0, seen * penalty, seen / penalty))
    return logits


def _sample_rows(logits: torch.Tensor, rows: Sequence[RowSampler]) -> torch.Tensor:
    """Draw one token per row of ``logits`` (all rows sampled, none greedy)."""
    vocab = logits.shape[-1]
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    # A vanishing temperature is greedy in all but name; the floor keeps logits finite.
    scaled = logits.float() / temperature.clamp(min=_MIN_TEMPERATURE).unsqueeze(1)
    # A request's extreme repetition penalty (any positive float is valid) can push
    # logits past float32's range; infinities would make softmax NaN and the draw an
    # index of -1, failing the whole batch. Clamped, they only stay the most likely.
    bound = torch.finfo(scaled.dtype)
    scaled = torch.nan_to_num(scaled, nan=bound.min, posinf=bound.max, neginf=bound.min)
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    # Candidates sorted by logit, as many as the widest row needs.
    values, indices = torch.topk(scaled, max(top_k), dim=-1, sorted=True)
    rank = torch.arange(values.shape[1], device=device).unsqueeze(0)
    limit = torch.tensor(top_k, device=device).unsqueeze(1)
    values = values.masked_fill(rank >= limit, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    # top_p 1 is off: no cut at all (a float32 running sum can reach 1 before the tail).
    top_p = torch.tensor(
        [r.params.top_p if r.params.top_p < 1 else float("inf") for r in rows], device=device
    ).unsqueeze(1)
    # Drop a candidate once the mass before it already reaches top_p (keeps at least one).
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.cat([torch.rand(1, generator=r.generator, device=device) for r in rows])
    target = (uniforms * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=values.shape[1] - 1)
    # A draw can land on a dropped candidate only by rounding; step back to a kept one.
    kept = probs.gather(1, choice) > 0
    choice = torch.where(kept, choice, (probs > 0).sum(dim=1, keepdim=True) - 1)
    return indices.gather(1, choice).squeeze(1)


def choose_tokens(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
    """The next token of every row; ``logits`` is [rows, vocab]."""
    logits = apply_repetition_penalty(logits, rows)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        draws = _sample_rows(logits.index_select(0, index), [rows[i] for i in sampled])
        chosen = chosen.index_copy(0, index, draws)
    tokens = [int(t) for t in chosen.tolist()]
    for row, token in zip(rows, tokens, strict=True):
        row.record(token)
    return tokens
