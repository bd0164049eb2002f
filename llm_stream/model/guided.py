"""Guided decoding: a constrained row's tokens always spell JSON that matches its schema.

Two halves, on two threads:

- :class:`Grammars` (one per model, on the preparation threads) compiles a
  request's :class:`~llm_stream.engine.types.JsonConstraint` with xgrammar
  when the request is prepared, so a bad schema is refused before it holds a
  row. Compiled grammars are kept in an LRU keyed by the schema's text; the
  tokenizer's vocabulary is read once per model, at the first constrained request.
- :class:`GuidedRows` (one per runner, on the scheduler thread) keeps a
  matcher per constrained row, keyed by the sequence's key (so rows moving
  between slots need nothing). Before a step samples, it fills each
  constrained row's bitmask on the host from its matcher and masks that row's
  logits to ``-inf`` outside it; free rows are left as they are. Once the
  step's tokens are on the host, each matcher takes its row's token. When a
  row's JSON is complete only the model's end-of-sequence ids stay allowed, so
  the row ends with END_OF_SEQUENCE.

Schemas compile in xgrammar's strict mode: no properties or items beyond those
a schema names (the output is still valid against it). Output is compact (no
free whitespace between JSON elements, ``", "`` and ``": "`` as separators):
whitespace a model may repeat without end is where a weak model rambles, and
the output is still ordinary JSON. Compact JSON never holds a raw control
character (below 0x20; strings escape them), so tokens that decode to one are
masked too: xgrammar 0.2.9 lets them into strings that have a ``maxLength`` or
``minLength``, which ``json.loads`` then refuses.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from llm_stream.engine.types import JsonConstraint
from llm_stream.errors import InvalidSchemaError, quoted_input
from llm_stream.model.transfer import Transfer

log = logging.getLogger(__name__)

# Compiled grammars kept per model (a schema compiles in milliseconds; a client
# repeating its schema, as tool-calling agents do, compiles it once).
GRAMMAR_CACHE_SIZE = 64
# What "any JSON object" (an empty schema) compiles from.
_ANY_OBJECT = '{"type": "object"}'
# xgrammar's C++ errors start with a time and a source location: not for clients.
_NATIVE_PREFIX = re.compile(r"^\s*\[[\d:.]+\]\s+\S+:\d+:\s*(Check failed:.*?is false:\s*)?")
_CONTROL = re.compile(rb"[\x00-\x1f]")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number"}
_JSON_KINDS.update({bool: "a boolean", type(None): "null"})


@dataclass(frozen=True)
class Guide:
    """A prepared request's constraint, ready for the runner: its compiled grammar, and
    the model's tokens that compact JSON may hold (a bitmask row, int32 words)."""

    grammar: xgr.CompiledGrammar
    printable: torch.Tensor


def logits_width(model: Any) -> int:
    """Columns of the model's logits: the output embedding's rows (it may exceed the
    tokenizer's length: the padding ids past it stay masked)."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def native_message(exc: BaseException) -> str:
    """xgrammar's error text without its time stamp and C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _NATIVE_PREFIX.sub("", text).strip().rstrip(".")


class Grammars:
    """One model's compiled grammars, built from its tokenizer (thread-safe)."""

    def __init__(
        self, model_id: str, tokenizer: Any, vocab_size: int, stop_ids: Collection[int]
    ) -> None:
        self._model_id = model_id
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._printable = torch.empty(0, dtype=torch.int32)
        self._cache: collections.OrderedDict[str, Guide] = collections.OrderedDict()

    def compile(self, constraint: JsonConstraint) -> Guide:
        """The grammar of ``constraint``; InvalidSchemaError saying what is wrong with it."""
        key = constraint.schema.strip()
        if key:
            check_schema(key)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            compiler = self._compiler_now()
            try:
                grammar = compiler.compile_json_schema(key or _ANY_OBJECT, any_whitespace=False)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise InvalidSchemaError(
                    f"the JSON schema cannot be used for guided decoding: {native_message(exc)}"
                ) from None
            guide = self._cache[key] = Guide(grammar, self._printable)
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
            return guide

    def _compiler_now(self) -> xgr.GrammarCompiler:
        """The compiler, its tokenizer info read at first use (some 0.1 s for 49k tokens)."""
        if self._compiler is None:
            try:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
            except Exception as exc:  # a tokenizer xgrammar cannot read
                log.warning("guided decoding is unavailable for %s", self._model_id, exc_info=True)
                raise InvalidSchemaError(
                    f"model {self._model_id!r} does not support guided decoding "
                    f"(its tokenizer: {native_message(exc)}); leave out the JSON constraint"
                ) from None
            threads = max(1, min(4, os.cpu_count() or 1))
            self._printable = printable_tokens(info, self._stop_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        return self._compiler


def printable_tokens(info: xgr.TokenizerInfo, stop_ids: Sequence[int]) -> torch.Tensor:
    """A bitmask row allowing every token but those decoding to a control character
    (end-of-sequence ids always allowed)."""
    vocab = info.vocab_size
    allowed = torch.ones(((vocab + 31) // 32) * 32, dtype=torch.bool)
    for token, text in enumerate(info.decoded_vocab):
        if _CONTROL.search(bytes(text)):
            allowed[token] = False
    allowed[list(stop_ids)] = True
    return pack_bits(allowed)


def pack_bits(allowed: torch.Tensor) -> torch.Tensor:
    """Bools (a multiple of 32) as xgrammar's bitmask words: token ``i`` is bit
    ``i % 32`` of word ``i // 32``."""
    bits = allowed.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def check_schema(text: str) -> None:
    """InvalidSchemaError unless ``text`` is a JSON object (a JSON Schema)."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidSchemaError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidSchemaError(
            f"the JSON schema must be a JSON object, not {_JSON_KINDS.get(type(schema), 'that')} "
            f'({quoted_input(text, 40)}); send e.g. {{"type": "object"}}'
        )


def stop_only(row: torch.Tensor, stop_ids: Sequence[int]) -> None:
    """Fill a bitmask row (int32 words, bit ``i % 32`` of word ``i // 32`` for token
    ``i``) that allows ``stop_ids`` only."""
    row.zero_()
    for stop in stop_ids:
        bit = 1 << (stop % 32)
        row[stop // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit


class GuidedRows:
    """The matchers of a runner's constrained rows, and the masks they give each step."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._transfer = Transfer(device)
        self._matchers: dict[int, xgr.GrammarMatcher] = {}
        # The model's tokens compact JSON may hold (every guide of a model has the same).
        self._printable = torch.empty(0, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)

    @property
    def active(self) -> bool:
        """Whether any row is constrained (free rows alone pay nothing)."""
        return bool(self._matchers)

    def start(self, keys: Sequence[int], guides: Sequence[Any]) -> None:
        """Rows joining: a fresh matcher for each that has a :class:`Guide` (before its
        first token); ``guides`` are prepared requests' ``grammar`` values."""
        for key, guide in zip(keys, guides, strict=True):
            if isinstance(guide, Guide):
                self._matchers[key] = xgr.GrammarMatcher(guide.grammar)
                self._printable = guide.printable

    def drop(self, keys: Collection[int]) -> None:
        for key in keys:
            self._matchers.pop(key, None)

    def clear(self) -> None:
        self._matchers.clear()

    def mask(self, logits: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        """``logits`` (``[len(keys), vocab]``, row i for ``keys[i]``) with every token a
        constrained row's grammar forbids at ``-inf``; the same tensor when none is.

        Never changes ``logits`` in place (it may be a CUDA graph's output buffer) and
        never waits for the device: the bitmask is filled on the host (pinned on a
        GPU) and copied without blocking.
        """
        filled = self.fill(keys, int(logits.shape[-1]))
        return logits if filled is None else self.apply(logits, *filled)

    def fill(self, keys: Sequence[int], vocab: int) -> tuple[list[int], torch.Tensor] | None:
        """The constrained rows among ``keys`` (their indices) and their bitmasks, on the
        host: int32 words, token ``t`` allowed when bit ``t % 32`` of word ``t // 32`` is
        set. None when no row is constrained."""
        rows = [(i, m) for i, key in enumerate(keys) if (m := self._matchers.get(key)) is not None]
        if not rows:
            return None
        host = torch.empty(
            (len(rows), (vocab + 31) // 32),
            dtype=torch.int32,
            pin_memory=self._device.type == "cuda",
        )
        for j, (_, matcher) in enumerate(rows):
            if matcher.is_terminated():  # its end-of-sequence is taken: nothing but another
                stop_only(host[j], matcher.stop_token_ids)
            else:
                matcher.fill_next_token_bitmask(host, j)
        clean = host & self._printable
        # A row left with nothing (a schema that demands a control character) keeps its own.
        host.copy_(torch.where(clean.any(dim=1, keepdim=True), clean, host))
        return [i for i, _ in rows], host

    def apply(self, logits: torch.Tensor, indices: list[int], host: torch.Tensor) -> torch.Tensor:
        """``logits`` with rows ``indices`` masked by ``host`` (from :meth:`fill`), out of place."""
        rows, words = host.shape
        vocab = int(logits.shape[-1])
        bitmask = host.to(self._device, non_blocking=True)
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1
        allowed = bits.view(rows, words * 32)[:, :vocab].bool()
        if rows == logits.shape[0]:
            return logits.masked_fill(~allowed, float("-inf"))
        index = self._transfer.to_device(indices, torch.long)
        masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
        return logits.index_copy(0, index, masked)

    def accept(self, tokens: Sequence[tuple[int, int]]) -> None:
        """A step's ``(key, token)`` pairs, on the host: each constrained row's matcher
        takes its token."""
        if not self._matchers:
            return
        for key, token in tokens:
            matcher = self._matchers.get(key)
            if matcher is None or matcher.is_terminated():
                continue
            if not matcher.accept_token(token):
                # Cannot happen while the mask is applied; never fail the batch for it.
                log.error("guided row %d: its grammar refused token %d; unconstraining", key, token)
                del self._matchers[key]
