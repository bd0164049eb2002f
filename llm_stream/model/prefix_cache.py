"""Prefix caching: the KV of sequences that left the batch, kept for prompts that
start the same way, and that of rows still running.

A chat sends its whole conversation every turn; so the KV of turn N's prompt and
answer, copied out of its slot when the row leaves, lets turn N+1 prefill only
its new tokens. A long system prompt shared by many users is reused the same way,
from a kept entry or straight from the slot of a row that is still running.
Which entry a prompt reuses, and what is evicted, is decided by
:class:`~llm_stream.model.prefix_index.PrefixIndex`.

Reuse is exact: a position's keys and values depend only on the tokens up to it,
so a prompt whose first ``n`` tokens are cached starts its prefill at ``n`` with
those ``n`` positions in its cache, as a chunked prefill does after its first
chunk. Every layer's entry keeps the whole sequence, sliding-window layers too
(as the slots do): the model masks a windowed layer by its window whatever the
cache holds, so a reused prefix changes nothing a windowed layer sees.

At least one prompt token is always computed: its logits give the first token.
Reuse stops at a block boundary (a multiple of 16 tokens): up to 16 more tokens
than the prompt's new ones are computed again. The arithmetic is exact, but not
the floating point: the CPU's kernels give bit for bit the same keys, values and
logits for a chunk whatever its length mostly when it starts at such a boundary
(measured on the default model, a 180-token prompt split in two: 9 of 11 splits
at multiples of 16 gave the whole prefill's last logits bit for bit, 1 of 41
other splits did), and greedy decoding meets top-two logits one rounding step
apart often enough to matter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llm_stream.model.prefix_index import BLOCK_TOKENS, Match, PrefixIndex, common_prefix


@dataclass(frozen=True)
class CachedKV:
    """One sequence's keys and values: per layer, ``[heads, tokens, dim]`` each."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]


# Room the KV budget leaves for cached entries, given the token costs of the running
# sequences (None: the cache has memory of its own, bounded by its capacity only).
Room = Callable[[Sequence[int]], int | None]


@dataclass(frozen=True)
class Reuse:
    """A prompt's cached prefix, held from admission until its prefill starts."""

    kv: CachedKV
    tokens: int


class PrefixCache:
    def __init__(self, capacity_tokens: int, room: Room) -> None:
        self.index: PrefixIndex[CachedKV] = PrefixIndex(capacity_tokens)
        self._room = room

    @property
    def capacity(self) -> int:
        return self.index.capacity

    def limit(self, running_costs: Sequence[int]) -> int:
        """The most tokens entries may hold beside sequences of these costs."""
        room = self._room(running_costs)
        return self.capacity if room is None else min(self.capacity, room)

    def fit(self, running_costs: Sequence[int]) -> None:
        """Evict until the cache fits what running sequences leave (they always win)."""
        self.index.fit(self.limit(running_costs))

    def lookup(self, prompt: Sequence[int]) -> Reuse | None:
        """The cached prefix ``prompt`` may start from: the whole blocks of its longest
        match, leaving at least its last token to compute."""
        match: Match[CachedKV] | None = self.index.lookup(prompt)
        if match is None:
            return None
        tokens = reusable(match.tokens, len(prompt))
        if not tokens:
            return None
        return Reuse(match.entry.payload, tokens)

    def store_slot(
        self,
        tokens: Sequence[int],
        slabs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        slot: int,
        running_costs: Sequence[int],
    ) -> None:
        """Copy slot ``slot``'s KV of ``tokens`` (its first ``len(tokens)`` positions) in."""
        limit = self.limit(running_costs)
        if not self.index.would_store(tokens, limit):
            return
        self.index.insert(tokens, slot_kv(slabs, slot, len(tokens)), limit)

    def keep(self, tokens: Sequence[int], kv: CachedKV, running_costs: Sequence[int]) -> None:
        """Keep ``kv`` (already copied) for ``tokens``, when it fits beside running ones."""
        self.index.insert(tokens, kv, self.limit(running_costs))

    def clear(self) -> None:
        self.index.clear()


def reusable(shared: int, prompt_length: int) -> int:
    """Of ``shared`` tokens held for a prompt of ``prompt_length``, those it reuses: whole
    blocks, and never its last token."""
    return min(shared, prompt_length - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def running_reuse(
    prompt: Sequence[int],
    rows: Sequence[tuple[Sequence[int], int]],
    slabs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    better_than: int = 0,
) -> Reuse | None:
    """A prefix of ``prompt`` held by a running row, when one holds more than
    ``better_than`` reusable tokens: copied out of the row's slot at once (the slot moves
    and grows). ``rows``: per slot, its tokens and how many of them have KV there."""
    best, best_slot = better_than, None
    head = list(prompt[:BLOCK_TOKENS])
    for slot, (tokens, held) in enumerate(rows):
        if held < BLOCK_TOKENS or list(tokens[:BLOCK_TOKENS]) != head:
            continue
        shared = reusable(min(common_prefix(prompt, tokens, BLOCK_TOKENS), held), len(prompt))
        if shared > best:
            best, best_slot = shared, slot
    if best_slot is None:
        return None
    return Reuse(slot_kv(slabs, best_slot, best), best)


def slot_kv(slabs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: int, length: int) -> CachedKV:
    """A copy of slot ``slot``'s first ``length`` positions (the slot is reused later)."""
    return CachedKV(
        [
            (keys[slot, :, :length].clone(), values[slot, :, :length].clone())
            for keys, values in slabs
        ]
    )


def seeded_cache(*reuses: Reuse) -> DynamicCache:
    """A prefill cache whose row ``i`` holds ``reuses[i]``'s prefix (all of one length):
    what a chunked prefill's cache holds after its first ``tokens`` tokens.

    One prompt's cache starts as views of the kept tensors, not copies (its first
    forward concatenates into new ones, leaving the entry as it was): a long chat's
    prefix is tens of megabytes, each copy milliseconds of its time to first token.
    """
    n = reuses[0].tokens
    assert all(reuse.tokens == n for reuse in reuses)
    cache = DynamicCache()
    for per_row in zip(*(reuse.kv.layers for reuse in reuses), strict=True):
        if len(per_row) == 1:
            keys, values = per_row[0][0][None, :, :n], per_row[0][1][None, :, :n]
        else:
            keys = torch.stack([row_keys[:, :n] for row_keys, _ in per_row])
            values = torch.stack([row_values[:, :n] for _, row_values in per_row])
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def copy_into_slot(
    reuse: Reuse, slabs: Sequence[tuple[torch.Tensor, torch.Tensor]], slot: int
) -> None:
    """Put the reused prefix at positions ``[0, reuse.tokens)`` of slot ``slot``."""
    n = reuse.tokens
    destinations, sources = [], []
    for (keys, values), (cached_keys, cached_values) in zip(slabs, reuse.kv.layers, strict=True):
        destinations += [keys[slot, :, :n], values[slot, :, :n]]
        sources += [cached_keys[:, :n], cached_values[:, :n]]
    torch._foreach_copy_(destinations, sources)
