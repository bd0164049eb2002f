"""The step primitives of one loaded model: prefill, decode one step, drop rows.

Implements the engine's ``StepRunner``. The decode batch is one left-padded KV
cache (:mod:`llm_stream.model.kv_batch`); whole prompts that arrive together
are prefilled as padded batches of similar lengths, and a prompt that the
scheduler splits into chunks builds its own one-row cache until its last chunk,
then joins. Runs on the model's scheduler thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import torch

from llm_stream.engine.types import BatchLostError, PrefillChunk
from llm_stream.model.kv_batch import (
    KVBatch,
    append,
    decode_step,
    extend_row,
    forward_prompts,
    remove_rows,
)
from llm_stream.model.sampling import RowSampler, choose_tokens, make_row_sampler

log = logging.getLogger(__name__)

# Whole prompts share one padded prefill while padding adds at most this share of work.
_MAX_PADDING_WASTE = 0.25


def group_by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that left padding to each group's longest costs little."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        size = lengths[index]
        # Sorted ascending, so the newcomer is the longest of the group it joins.
        if current and size * (len(current) + 1) > (1 + _MAX_PADDING_WASTE) * (total + size):
            groups.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        groups.append(current)
    return groups


class HFStepRunner:
    def __init__(self, model: Any, device: torch.device, pad_id: int) -> None:
        self._model = model
        self._device = device
        self._pad_id = pad_id
        self._batch: KVBatch | None = None
        self._order: list[int] = []
        self._last: torch.Tensor | None = None  # [rows]: the token each row feeds next
        self._samplers: dict[int, RowSampler] = {}
        self._partial: dict[int, KVBatch] = {}  # one-row caches of chunked prompts

    @property
    def rows(self) -> int:
        return len(self._order)

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> list[int | None]:
        results: list[int | None] = [None] * len(chunks)
        joining: list[tuple[KVBatch, list[int], list[int]]] = []
        whole = [i for i, c in enumerate(chunks) if c.start == 0 and c.completes_prompt]
        whole_set = set(whole)
        lengths = [len(chunks[i].prepared.prompt_ids) for i in whole]
        for group in group_by_length(lengths):
            members = [chunks[whole[g]] for g in group]
            batch, logits = forward_prompts(
                self._model, [c.prepared.prompt_ids for c in members], self._pad_id, self._device
            )
            tokens = self._first_tokens(members, logits)
            for g, token in zip(group, tokens, strict=True):
                results[whole[g]] = token
            joining.append((batch, [c.key for c in members], tokens))
        for index, chunk in enumerate(chunks):
            if index in whole_set:
                continue
            part = chunk.prepared.prompt_ids[chunk.start : chunk.end]
            if chunk.start == 0:
                batch, logits = forward_prompts(self._model, [part], self._pad_id, self._device)
                self._partial[chunk.key] = batch
            else:
                batch = self._partial[chunk.key]
                logits = extend_row(self._model, batch, part)
            if chunk.completes_prompt:
                del self._partial[chunk.key]
                tokens = self._first_tokens([chunk], logits)
                results[index] = tokens[0]
                joining.append((batch, [chunk.key], tokens))
        try:
            self._join(joining)
        except Exception as exc:  # some layers may hold the new rows and others not
            self.reset()
            raise BatchLostError("adding prefilled rows to the batch failed") from exc
        return results

    def _first_tokens(self, chunks: Sequence[PrefillChunk], logits: torch.Tensor) -> list[int]:
        for chunk in chunks:
            self._samplers[chunk.key] = make_row_sampler(
                chunk.prepared.request.sampling, chunk.prepared.prompt_ids, self._device
            )
        return choose_tokens(logits, [self._samplers[c.key] for c in chunks])

    def _join(self, joining: Sequence[tuple[KVBatch, list[int], list[int]]]) -> None:
        last = [] if self._last is None else [self._last]
        for batch, keys, tokens in joining:
            if self._batch is None:
                self._batch = batch
            else:
                append(self._batch, batch)
            self._order.extend(keys)
            last.append(torch.tensor(tokens, dtype=torch.long, device=self._device))
        if last:
            self._last = torch.cat(last)

    @torch.inference_mode()
    def decode(self) -> list[tuple[int, int]]:
        if self._batch is None or self._last is None:
            return []
        logits = decode_step(self._model, self._batch, self._last)
        tokens = choose_tokens(logits, [self._samplers[key] for key in self._order])
        self._last = torch.tensor(tokens, dtype=torch.long, device=self._device)
        return list(zip(self._order, tokens, strict=True))

    @torch.inference_mode()
    def remove(self, keys: Collection[int]) -> None:
        for key in keys:
            self._partial.pop(key, None)
            self._samplers.pop(key, None)
        drop = [i for i, key in enumerate(self._order) if key in keys]
        if not drop:
            return
        if len(drop) == len(self._order):
            # The decode batch is empty; prompts still being fed in chunks stay.
            self._batch, self._last, self._order = None, None, []
            return
        assert self._batch is not None and self._last is not None
        order = remove_rows(self._batch, drop)
        self._last = self._last[order]
        self._order = [self._order[i] for i in order]

    def reset(self) -> None:
        self._batch = None
        self._last = None
        self._order = []
        self._samplers.clear()
        self._partial.clear()
