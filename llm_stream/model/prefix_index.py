"""Which token sequences' KV the server still holds, found by longest common prefix.

Pure Python (no torch): the runner stores each entry's KV as an opaque payload,
and this index decides what a new prompt can reuse and what to evict.

An entry is one sequence's tokens (a prompt and what was generated after it),
whole. A prompt reuses the longest prefix it shares with any entry, to the
token: a chat's next turn shares everything up to the new user message, even
where the template's text after the answer differs from what the model
generated. Entries are found through chained hashes of their 16-token blocks
(one dict probe per block of the prompt), then compared token by token.

Memory is counted in tokens. :meth:`PrefixIndex.fit` evicts least recently used
entries down to a limit; the runner calls it with what the KV budget leaves
free, so running sequences always win over cached ones. An entry that another
one extends (the previous turn of the same chat) is dropped when the longer one
arrives: it could only ever give a shorter match.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

BLOCK_TOKENS = 16
# At most this many entries sharing a prompt's deepest matching block are compared
# token by token (many users behind one system prompt share its blocks).
_MAX_CANDIDATES = 16

Payload = TypeVar("Payload")

_ids = itertools.count(1)


def block_hashes(tokens: Sequence[int]) -> Iterator[int]:
    """The chained hash after each full block of ``tokens``: the j-th names tokens
    ``[0, (j + 1) * BLOCK_TOKENS)``, whatever their position in a longer sequence."""
    chained = 0
    for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        chained = hash((chained, tuple(tokens[start : start + BLOCK_TOKENS])))
        yield chained


def common_prefix(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b``, known to be at least ``start``."""
    most = min(len(a), len(b))
    n = start
    while n < most and a[n] == b[n]:
        n += 1
    return n


@dataclass(eq=False)
class Entry(Generic[Payload]):
    tokens: tuple[int, ...]
    payload: Payload
    hashes: list[int]
    id: int = field(default_factory=lambda: next(_ids))

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Match(Generic[Payload]):
    """A prompt's longest cached prefix: the entry holding it and how many tokens."""

    entry: Entry[Payload]
    tokens: int


class PrefixIndex(Generic[Payload]):
    def __init__(self, capacity: int) -> None:
        """``capacity``: the most tokens the entries may hold together."""
        self.capacity = capacity
        self.used = 0
        # Tokens of entries evicted for room so far (not those superseded by longer ones).
        self.evicted = 0
        # Least recently used first.
        self._entries: collections.OrderedDict[int, Entry[Payload]] = collections.OrderedDict()
        self._by_block: dict[int, dict[int, Entry[Payload]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry[Payload]]:
        """Least recently used first."""
        return list(self._entries.values())

    # -- lookup ------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], *, touch: bool = True) -> Match[Payload] | None:
        """The entry sharing the longest prefix with ``tokens`` (at least one block),
        made the most recently used unless ``touch`` is False; None when none does."""
        deepest = 0
        candidates: dict[int, Entry[Payload]] = {}
        for depth, chained in enumerate(block_hashes(tokens), start=1):
            found = self._by_block.get(chained)
            if not found:
                break
            deepest, candidates = depth, found
        if not deepest:
            return None
        floor = deepest * BLOCK_TOKENS
        best: Match[Payload] | None = None
        # The most recently stored first: the likeliest to be the same conversation.
        for entry in itertools.islice(reversed(candidates.values()), _MAX_CANDIDATES):
            if tuple(tokens[:floor]) != entry.tokens[:floor]:
                continue  # a hash collision
            n = common_prefix(tokens, entry.tokens, floor)
            if best is None or n > best.tokens:
                best = Match(entry, n)
        if best is not None and touch:
            self._entries.move_to_end(best.entry.id)
        return best

    # -- storing and evicting -------------------------------------------------------------

    def would_store(self, tokens: Sequence[int], limit: int | None = None) -> bool:
        """Whether :meth:`insert` of ``tokens`` would keep them: at least a block, within
        the limit, and not already held whole by an entry."""
        if len(tokens) < BLOCK_TOKENS or len(tokens) > min(self._limit(limit), self.capacity):
            return False
        match = self.lookup(tokens, touch=False)
        return match is None or match.tokens < len(tokens)

    def insert(
        self, tokens: Sequence[int], payload: Payload, limit: int | None = None
    ) -> Entry[Payload] | None:
        """Store ``payload`` for ``tokens`` as the most recently used entry, evicting
        down to ``limit`` (or the capacity) tokens; entries it extends are dropped.

        Returns the entry, or None when it was not kept (see :meth:`would_store`).
        """
        if not self.would_store(tokens, limit):
            return None
        key = tuple(tokens)
        hashes = list(block_hashes(key))
        for superseded in self._prefixes_of(key, hashes):
            self._remove(superseded)
        entry = Entry(key, payload, hashes)
        self._entries[entry.id] = entry
        for chained in hashes:
            self._by_block.setdefault(chained, {})[entry.id] = entry
        self.used += len(key)
        self.fit(limit)
        return entry

    def fit(self, limit: int | None = None) -> int:
        """Evict least recently used entries until they hold at most ``limit`` tokens
        (never more than the capacity); returns the tokens evicted."""
        bound = self._limit(limit)
        evicted = 0
        while self.used > bound and self._entries:
            _, oldest = next(iter(self._entries.items()))
            evicted += len(oldest)
            self._remove(oldest)
        self.evicted += evicted
        return evicted

    def clear(self) -> None:
        self._entries.clear()
        self._by_block.clear()
        self.used = 0

    # -- internals ---------------------------------------------------------------------

    def _limit(self, limit: int | None) -> int:
        return self.capacity if limit is None else max(0, min(limit, self.capacity))

    def _prefixes_of(self, tokens: tuple[int, ...], hashes: list[int]) -> list[Entry[Payload]]:
        """Entries whose every token starts ``tokens``: each is found at its last block."""
        found = []
        for depth, chained in enumerate(hashes, start=1):
            for entry in self._by_block.get(chained, {}).values():
                size = len(entry)
                ends_here = depth * BLOCK_TOKENS <= size < (depth + 1) * BLOCK_TOKENS
                if ends_here and size <= len(tokens) and tokens[:size] == entry.tokens:
                    found.append(entry)
        return found

    def _remove(self, entry: Entry[Payload]) -> None:
        if self._entries.pop(entry.id, None) is None:
            return
        for chained in entry.hashes:
            holders = self._by_block.get(chained)
            if holders is not None:
                holders.pop(entry.id, None)
                if not holders:
                    del self._by_block[chained]
        self.used -= len(entry)
