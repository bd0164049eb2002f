"""Next-token choice for the whole batch, on the model's device, each row with its own settings.

Every row's settings live in device tensors indexed like the batch's rows, so a
step chooses every row's token with a fixed handful of kernel launches and no
host sync: greedy rows take the argmax; sampled rows apply temperature, then
top-k (taking the top candidates once for all rows), then top-p over those
candidates, then one draw per row by inverting the cumulative distribution with
a single uniform number. That number is a counter-based hash of the row's seed
and the position of the token being drawn: there is no generator state to keep,
move or capture, it is the same on the CPU and the GPU, and the same seed draws
the same numbers whatever else is in the batch, so the same seed gives the same
text for the same logits.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch

from llm_stream.engine.types import SamplingParams
from llm_stream.model.slots import RowMoves
from llm_stream.model.transfer import Transfer

_MIN_TEMPERATURE = 1e-4
_MASK32 = 0xFFFFFFFF
# A 32-bit integer hash multiplier small enough that x * it never leaves int64.
_MIX = 0x45D9F3B
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32), without overflow."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def uniforms(seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One float32 in [0, 1) per row, a pure function of (seed, position)."""
    h = _mix(seed_lo)
    h = _mix(h ^ seed_hi)
    h = _mix(h ^ (position & _MASK32))
    h = _mix((h + _GOLDEN) & _MASK32)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def split_seed(seed: int | None) -> tuple[int, int]:
    """A request's seed as two 32-bit halves; no seed draws a fresh random one."""
    value = secrets.randbits(64) if seed is None else seed % (1 << 64)
    return value & _MASK32, value >> 32


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Divide positive (multiply negative) logits of ids a row has seen, per row.

    ``seen`` is ``[rows, vocab]`` bool, ``penalty`` ``[rows]``; a penalty of 1 is exact
    identity, so rows without one pass through unchanged.
    """
    scale = penalty.unsqueeze(1)
    penalised = torch.where(logits < 0, logits * scale, logits / scale)
    return torch.where(seen, penalised, logits)


def sample_rows(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    draws: torch.Tensor,
    candidates: int,
) -> torch.Tensor:
    """One token per row drawn from its tempered, top-k/top-p-cut distribution.

    ``candidates`` is the widest top-k of the rows (the vocabulary for rows with
    none); ``draws`` holds one uniform number per row.
    """
    scaled = logits.float() / temperature.clamp(min=_MIN_TEMPERATURE).unsqueeze(1)
    # A request's extreme repetition penalty (any positive float is valid) can push
    # logits past float32's range; infinities would make softmax NaN and the draw an
    # index of -1, failing the whole batch. Clamped, they only stay the most likely.
    bound = torch.finfo(scaled.dtype)
    scaled = torch.nan_to_num(scaled, nan=bound.min, posinf=bound.max, neginf=bound.min)
    values, indices = torch.topk(scaled, candidates, dim=-1, sorted=True)
    rank = torch.arange(candidates, device=logits.device).unsqueeze(0)
    vocab = logits.shape[-1]
    limit = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).unsqueeze(1)
    values = values.masked_fill(rank >= limit, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    # top_p 1 is off: no cut at all (a float32 running sum can reach 1 before the tail).
    cut = torch.where(top_p < 1, top_p, float("inf")).unsqueeze(1)
    # Drop a candidate once the mass before it already reaches top_p (keeps at least one).
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(before >= cut, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (draws * cdf[:, -1]).unsqueeze(1)
    choice = torch.searchsorted(cdf, target, right=True).clamp(max=candidates - 1)
    # A draw can land on a dropped candidate only by rounding; step back to a kept one.
    kept = probs.gather(1, choice) > 0
    choice = torch.where(kept, choice, (probs > 0).sum(dim=1, keepdim=True) - 1)
    return indices.gather(1, choice).squeeze(1)


# Each row's settings as device tensors: (attribute, dtype, value of a free row).
_ROW_SETTINGS = (
    ("temperature", torch.float32, 0.0),
    ("top_k", torch.long, 0),
    ("top_p", torch.float32, 1.0),
    ("penalty", torch.float32, 1.0),
    ("seed_lo", torch.long, 0),
    ("seed_hi", torch.long, 0),
)


class BatchSampler:
    """The sampling settings of every batch row, on the device, moved as rows move.

    The host keeps a copy of each row's settings, so the choices that shape a
    step (any sampled rows? any penalties? how many candidates?) need no sync.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor
    seed_lo: torch.Tensor
    seed_hi: torch.Tensor

    def __init__(self, rows: int, device: torch.device) -> None:
        self.device = device
        self._transfer = Transfer(device)
        self._params: list[SamplingParams | None] = [None] * rows
        for name, dtype, fill in _ROW_SETTINGS:
            setattr(self, name, torch.full((rows,), fill, dtype=dtype, device=device))
        # Ids each row has seen, for the repetition penalty; made when first needed.
        self._seen: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return len(self._params)

    def _tensors(self) -> list[torch.Tensor]:
        tensors = [getattr(self, name) for name, _, _ in _ROW_SETTINGS]
        return tensors if self._seen is None else [*tensors, self._seen]

    def grow(self, rows: int) -> None:
        """Room for ``rows`` rows (the CPU batch grows; the GPU batch is sized up front)."""
        if rows <= self.rows:
            return
        extra = rows - self.rows
        self._params.extend([None] * extra)
        for name, dtype, fill in _ROW_SETTINGS:
            more = torch.full((extra,), fill, dtype=dtype, device=self.device)
            setattr(self, name, torch.cat([getattr(self, name), more]))
        if self._seen is not None:
            more_seen = self._seen.new_zeros((extra, self._seen.shape[1]))
            self._seen = torch.cat([self._seen, more_seen])

    def place(
        self,
        first: int,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        *,
        vocab: int,
    ) -> None:
        """Rows ``first`` onwards take these sequences' settings (and prompts, for penalties)."""
        rows = slice(first, first + len(params))
        self._params[rows] = list(params)
        seeds = [split_seed(p.seed) for p in params]
        for tensor, values in (
            (self.temperature, [p.temperature for p in params]),
            (self.top_k, [p.top_k for p in params]),
            (self.top_p, [p.top_p for p in params]),
            (self.penalty, [p.repetition_penalty for p in params]),
            (self.seed_lo, [lo for lo, _ in seeds]),
            (self.seed_hi, [hi for _, hi in seeds]),
        ):
            tensor[rows].copy_(self._transfer.host(values, tensor.dtype), non_blocking=True)
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if penalised:
            seen = self._seen_rows(vocab)
            seen[rows].zero_()
            for i in penalised:
                ids = self._transfer.to_device(list(prompts[i]), torch.long)
                seen[first + i].index_fill_(0, ids, True)

    def _seen_rows(self, vocab: int) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros((self.rows, vocab), dtype=torch.bool, device=self.device)
        return self._seen

    def move(self, moves: RowMoves) -> None:
        """Rows follow the batch's compaction (:meth:`SlotBatch.remove`)."""
        for tensor in self._tensors():
            moves.apply(tensor)
        for target, source in moves.pairs:
            self._params[target] = self._params[source]

    def clear(self, rows: slice) -> None:
        self._params[rows] = [None] * len(self._params[rows])

    def sample(
        self, logits: torch.Tensor, rows: slice, positions: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The next token of rows ``rows`` (long, on the device); ``logits`` is ``[rows, vocab]``.

        ``positions()`` gives the position each row's new token will take: with the
        seed, it picks the row's uniform number. It is called only when a row samples,
        so an all-greedy step costs its argmax alone.
        """
        params = [p for p in self._params[rows] if p is not None]
        if any(p.repetition_penalty != 1.0 for p in params):
            logits = apply_repetition_penalty(
                logits.float(), self._seen_rows(logits.shape[-1])[rows], self.penalty[rows]
            )
        chosen = logits.argmax(dim=-1)
        sampled = [p for p in params if not p.greedy]
        if sampled:
            vocab = logits.shape[-1]
            candidates = max(p.top_k if 0 < p.top_k < vocab else vocab for p in sampled)
            temperature = self.temperature[rows]
            draws = uniforms(self.seed_lo[rows], self.seed_hi[rows], positions())
            drawn = sample_rows(
                logits,
                temperature=temperature,
                top_k=self.top_k[rows],
                top_p=self.top_p[rows],
                draws=draws,
                candidates=candidates,
            )
            chosen = torch.where(temperature > 0, drawn, chosen)
        return chosen

    def record(self, tokens: torch.Tensor, rows: slice) -> None:
        """Remember the tokens just chosen, for rows with a repetition penalty."""
        if self._seen is None:
            return
        if any(p is not None and p.repetition_penalty != 1.0 for p in self._params[rows]):
            self._seen[rows].scatter_(1, tokens.unsqueeze(1), True)
