"""The step runner of one loaded model: carries out the scheduler's plans.

Implements the engine's ``StepRunner``. The decode batch is a
:class:`~llm_stream.model.slots.SlotBatch`; whole prompts that arrive together
are prefilled as padded batches of similar lengths, and a prompt that the
scheduler splits into chunks builds its own one-row cache until its last chunk,
then joins. Tokens are chosen on the device (:mod:`llm_stream.model.sampling`).

On a GPU a step is only queued: ``launch`` returns once the device has the
work, and the one device-to-host copy of the chosen tokens is waited for in
``collect``, which the scheduler calls after launching the next step. The
decode forward itself is replayed from a CUDA graph where one was captured
(:mod:`llm_stream.model.cuda_graphs`). Runs on the model's scheduler thread only.

Guided decoding (:mod:`llm_stream.model.guided`): a constrained row's logits are
masked by its grammar before sampling, outside any graph, and its matcher takes
the row's token in ``collect``. The mask of step N+1 needs step N's token, so
while any row is constrained the runner's ``pipeline_depth`` is 0: the scheduler
collects each step before it launches the next. Free rows alone pipeline as before.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llm_stream.engine.types import (
    BatchLostError,
    CacheBudget,
    PrefillChunk,
    PreparedRequest,
    StepPlan,
    StepTokens,
)
from llm_stream.model.cuda_graphs import DecodeGraphs
from llm_stream.model.guided import GuidedRows
from llm_stream.model.prefix_cache import (
    PrefixCache,
    Reuse,
    copy_into_slot,
    running_reuse,
    seeded_cache,
)
from llm_stream.model.sampling import BatchSampler
from llm_stream.model.slots import (
    PartialPrompt,
    SlotBatch,
    extend_prompt,
    extend_prompts,
    forward_prompts,
    start_prompt,
)

log = logging.getLogger(__name__)

# Whole prompts share one padded prefill while padding adds at most this share of work.
_MAX_PADDING_WASTE = 0.25
# When no established stream decodes (a cold start and its wave), whole prompts go to
# padded eager batches rather than one by one to the staging slot when there are at
# least this many per batch. Measured on an H200 (1B shape): 64 mixed prompts got their
# first tokens after 162 ms in about 7 eager batches against 251-258 ms staged, 32 equal
# ones 42 against 117 ms; 8 mixed ones 32-35 ms staged against 189 ms in eager batches.
_EAGER_BATCH_PROMPTS = 8


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


@dataclass
class _Launched:
    """A step queued on the device, and where its tokens will land."""

    step: int
    keys: list[int] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # on the host (pinned on a GPU), filled by a copy
    done: torch.cuda.Event | None = None
    failed: list[tuple[int, BaseException]] = field(default_factory=list)


class HFStepRunner:
    def __init__(
        self,
        model: Any,
        batch: SlotBatch,
        budget: CacheBudget,
        *,
        pad_id: int,
    ) -> None:
        self._model = model
        self._batch = batch
        self._device = batch.device
        self._pad_id = pad_id
        self.budget = budget
        self._depth = 1 if self._device.type == "cuda" else 0
        self._sampler = BatchSampler(batch.capacity_rows, self._device)
        self._guided = GuidedRows(self._device)
        self._partial: dict[int, PartialPrompt] = {}
        self._in_flight: collections.deque[_Launched] = collections.deque()
        self.graphs: DecodeGraphs | None = None
        # Prompt chunks fed in the staging slot by fixed shapes (graphs on a GPU), and the
        # prompt that slot holds between steps (one fed in several chunks) with its length.
        self.chunk_graphs: DecodeGraphs | None = None
        self._staged: int | None = None
        self._staged_length = 0
        # Prefix caching (None: off). Per admitted sequence: its token cost; its reused
        # prefix until its prefill starts; once in the batch, its tokens (prompt and
        # sampled), whose KV is stored when its row leaves.
        self.prefix: PrefixCache | None = None
        self._costs: dict[int, int] = {}
        self._reuse: dict[int, Reuse] = {}
        self._history: dict[int, list[int]] = {}

    @property
    def rows(self) -> int:
        return self._batch.rows

    @property
    def pipeline_depth(self) -> int:
        """Steps the scheduler may keep in flight: 0 while a constrained row needs each
        token on the host before its next mask; 1 otherwise on a GPU."""
        return 0 if self._guided.active else self._depth

    @pipeline_depth.setter
    def pipeline_depth(self, depth: int) -> None:
        self._depth = depth

    # -- the seam ----------------------------------------------------------------

    def reuse_prefix(self, key: int, prepared: PreparedRequest) -> int:
        """Admission of ``key``: how many of its prompt tokens come from the prefix cache or
        a running row (its prefill starts there), after evicting what its admission needs."""
        if self.prefix is None:
            return 0
        self._costs[key] = prepared.token_cost
        costs = list(self._costs.values())
        try:
            reuse = self._find_prefix(prepared.prompt_ids, costs)
        except Exception:  # the cache is an optimisation: it never fails a request
            log.warning("prefix cache lookup failed; prefilling the whole prompt", exc_info=True)
            return 0
        if reuse is None:
            return 0
        self._reuse[key] = reuse
        return reuse.tokens

    def _find_prefix(self, prompt: Sequence[int], costs: list[int]) -> Reuse | None:
        """The longest reusable prefix of ``prompt``: kept, or in a running row's slot.
        One taken from a slot is kept too (when it fits), so the next prompt behind the
        same prefix (a burst behind one system prompt) shares it instead of copying it."""
        assert self.prefix is not None
        self.prefix.fit(costs)
        reuse = self.prefix.lookup(prompt)
        batch = self._batch
        rows: list[tuple[list[int], int]] = []  # per slot: its tokens, and those in the slot
        for row_key, length in zip(batch.keys, batch.lengths, strict=True):
            history = self._history.get(row_key, [])
            rows.append((history, min(length, len(history))))
        from_row = running_reuse(
            prompt, rows, batch.slabs, better_than=0 if reuse is None else reuse.tokens
        )
        if from_row is None:
            return reuse
        self.prefix.keep(prompt[: from_row.tokens], from_row.kv, costs)
        return from_row

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> None:
        launched = _Launched(plan.step)
        parts: list[torch.Tensor] = []
        self._remove(plan.remove)
        if plan.decode and self._batch.rows:
            launched.keys.extend(self._batch.keys)
            parts.append(self._decode())
        prefilled = self._prefill(plan.prefill, launched.failed, established=plan.established)
        for key, _ in launched.failed:  # the scheduler ends them: nothing of theirs stays
            self._costs.pop(key, None)
            self._reuse.pop(key, None)
        for keys, first in prefilled:
            launched.keys.extend(keys)
            parts.append(first)
        if parts:
            tokens = torch.cat(parts) if len(parts) > 1 else parts[0]
            if self._device.type == "cuda":
                # The step's one device-to-host copy; collect() waits for it.
                launched.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                launched.tokens.copy_(tokens, non_blocking=True)
                launched.done = torch.cuda.Event()
                launched.done.record()
            else:
                launched.tokens = tokens
        self._in_flight.append(launched)

    def collect(self) -> StepTokens:
        launched = self._in_flight.popleft()
        if launched.done is not None:
            launched.done.synchronize()
        values = [] if launched.tokens is None else launched.tokens.tolist()
        tokens = tuple(zip(launched.keys, values, strict=True))
        self._guided.accept(tokens)
        if self.prefix is not None:
            for key, token in zip(launched.keys, values, strict=True):
                history = self._history.get(key)
                if history is not None:
                    history.append(token)
        return StepTokens(launched.step, tokens, tuple(launched.failed))

    @torch.inference_mode()
    def reset(self) -> None:
        self._in_flight.clear()
        self._partial.clear()
        self._staged = None
        self._costs.clear()
        self._reuse.clear()
        self._history.clear()
        self._guided.clear()
        if self.prefix is not None:
            self.prefix.clear()
        self._batch.reset()
        self._sampler.clear(slice(0, self._sampler.rows))

    # -- leaving ---------------------------------------------------------------------

    def _remove(self, keys: Collection[int]) -> None:
        if not keys:
            return
        for key in keys:
            self._partial.pop(key, None)
            self._reuse.pop(key, None)
            self._costs.pop(key, None)
        if self._staged in keys:
            self._staged = None
        self._guided.drop(keys)
        if self.prefix is not None:
            self._store_leaving(keys)
        before = self._batch.rows
        moves = self._batch.remove(list(keys))
        if moves is not None:
            self._sampler.move(moves)
        self._sampler.clear(slice(self._batch.rows, before))

    def _store_leaving(self, keys: Collection[int]) -> None:
        """Copy the KV of rows about to leave into the prefix cache."""
        assert self.prefix is not None
        batch = self._batch
        slots = {key: slot for slot, key in enumerate(batch.keys)}
        costs = list(self._costs.values())
        for key in keys:
            history = self._history.pop(key, None)
            slot = slots.get(key)
            if history is None or slot is None:
                continue
            # Positions with KV: the prompt and every sampled token fed back so far.
            length = min(batch.lengths[slot], len(history))
            try:
                self.prefix.store_slot(history[:length], batch.slabs, slot, costs)
            except Exception:  # out of memory, say: the batch goes on, uncached
                log.warning("could not keep a finished sequence's KV", exc_info=True)

    # -- decoding ------------------------------------------------------------------------

    def _decode(self) -> torch.Tensor:
        batch = self._batch
        rows = batch.rows
        width = max(batch.lengths) + 1
        if self.graphs is not None:  # fixed buffers: a bucket's shape, captured or not
            logits = self.graphs.replay(rows, width)[:rows]
        else:
            batch.ensure(rows, width)  # this step writes at width - 1, and opens width
            logits = self.forward_decode(rows, width)
        logits = self._guided.mask(logits, batch.keys[:rows])
        tokens = self._sampler.sample(logits, slice(0, rows), lambda: batch.pos[:rows] + 1)
        self._sampler.record(tokens, slice(0, rows))
        batch.advance(tokens)
        return tokens

    def forward_decode(self, rows: int, width: int) -> torch.Tensor:
        """The decode forward of slots ``[0, rows)`` over ``width`` positions: [rows, vocab] logits.

        What a CUDA graph captures: every input is a slice of the batch's fixed buffers.
        """
        out = self._model(**self._batch.decode_inputs(rows, width), logits_to_keep=1)
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def forward_chunk(self, tokens: int, width: int) -> torch.Tensor:
        """A staged prompt chunk of ``tokens`` (padded) over ``width`` positions: the
        logits of its last real token, [1, vocab]. What a prefill graph captures."""
        out = self._model(**self._batch.chunk_inputs(tokens, width))
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    # -- prompts -------------------------------------------------------------------------

    def _batches_pay(self, chunks: Sequence[PrefillChunk], established: int) -> bool:
        """Whether, with no established stream to hold back, the whole prompts are many
        enough per padded batch for a few eager forwards to beat feeding them one by one
        (an eager forward is some 10 ms of launches on a GPU, whatever its size)."""
        if established or self._staged is not None:
            return False
        lengths = [
            len(c.prepared.prompt_ids) for c in chunks if c.start == 0 and c.completes_prompt
        ]
        if len(lengths) < len(chunks):
            return False
        return len(lengths) >= _EAGER_BATCH_PROMPTS * len(group_by_length(lengths))

    def _prefill(
        self,
        chunks: Sequence[PrefillChunk],
        failed: list[tuple[int, BaseException]],
        *,
        established: int = 0,
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Feed the chunks; returns, per group that joined, its keys and first tokens.

        With prefill graphs, each chunk is fed in the staging slot by fixed-shape
        replays, whose cost is the chunk's compute, not hundreds of launches: a step
        that also decodes established streams stays short. A chunk that finds the slot
        held by another prompt (fed over several steps) takes the eager path, with its
        own cache, and so do many whole prompts of a cold start (``_batches_pay``).
        """
        if self.chunk_graphs is None or self._batches_pay(chunks, established):
            return self._prefill_eager(chunks, failed)
        joined: list[tuple[list[int], torch.Tensor]] = []
        eager = []
        for chunk in chunks:
            starts = chunk.start == 0 or chunk.key in self._reuse
            if not (self._staged == chunk.key or (starts and self._staged is None)):
                eager.append(chunk)
                continue
            try:
                logits = self._feed_staged(chunk)
            except Exception as exc:  # a failed prefill fails its own sequence only
                self._staged = None
                failed.append((chunk.key, exc))
                continue
            if chunk.completes_prompt:
                self._staged = None
                joined.append(self._join_staged(chunk, logits))
        return joined + self._prefill_eager(eager, failed)

    def _feed_staged(self, chunk: PrefillChunk) -> torch.Tensor:
        graphs = self.chunk_graphs
        assert graphs is not None
        if self._staged != chunk.key:  # a prompt's first chunk takes the slot
            reuse = self._reuse.pop(chunk.key, None)
            self._staged, self._staged_length = chunk.key, 0
            if reuse is not None:
                copy_into_slot(reuse, self._batch.slabs, self._batch.view.staging_row)
                self._staged_length = reuse.tokens
        if self._staged_length != chunk.start:
            raise RuntimeError("a staged prompt's chunks came out of order")
        tokens = chunk.prepared.prompt_ids[chunk.start : chunk.end]
        most = graphs.sizes[-1]
        logits = None
        for offset in range(0, len(tokens), most):
            piece = tokens[offset : offset + most]
            start = chunk.start + offset
            self._batch.stage(piece, start)
            logits = graphs.replay(len(piece), start + len(piece))
        self._staged_length = chunk.end
        assert logits is not None
        return logits

    def _join_staged(
        self, chunk: PrefillChunk, logits: torch.Tensor
    ) -> tuple[list[int], torch.Tensor]:
        length = len(chunk.prepared.prompt_ids)
        return self._join(
            [chunk],
            logits,
            [length],
            lambda keys, tokens: self._batch.join_staged(keys[0], length, tokens),
        )

    def _prefill_eager(
        self, chunks: Sequence[PrefillChunk], failed: list[tuple[int, BaseException]]
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Whole prompts as padded batches of similar lengths; chunks in one-row caches."""
        joined: list[tuple[list[int], torch.Tensor]] = []
        whole = [c for c in chunks if c.start == 0 and c.completes_prompt]
        for group in group_by_length([len(c.prepared.prompt_ids) for c in whole]):
            members = [whole[g] for g in group]
            try:
                cache, logits = forward_prompts(
                    self._model,
                    [c.prepared.prompt_ids for c in members],
                    self._pad_id,
                    self._device,
                )
            except Exception as exc:  # a failed prefill fails its own sequences only
                failed.extend((c.key, exc) for c in members)
                continue
            lengths = [len(c.prepared.prompt_ids) for c in members]
            joined.append(self._join_cache(members, cache, lengths, logits))
        batched: set[int] = set()
        for rests in self._reused_groups(chunks):
            batched.update(c.key for c in rests)
            try:
                cache = seeded_cache(*(self._reuse.pop(c.key) for c in rests))
                logits = extend_prompts(
                    self._model,
                    cache,
                    [c.prepared.prompt_ids[c.start : c.end] for c in rests],
                    rests[0].start,
                    pad_id=self._pad_id,
                    device=self._device,
                )
            except Exception as exc:  # a failed prefill fails its own sequences only
                failed.extend((c.key, exc) for c in rests)
                continue
            lengths = [c.end for c in rests]
            joined.append(self._join_cache(rests, cache, lengths, logits, right_padded=True))
        for chunk in chunks:
            if (chunk.start == 0 and chunk.completes_prompt) or chunk.key in batched:
                continue
            part = chunk.prepared.prompt_ids[chunk.start : chunk.end]
            try:
                if chunk.start == 0:
                    partial, logits = start_prompt(self._model, part, self._device)
                    self._partial[chunk.key] = partial
                else:
                    if chunk.key not in self._partial:
                        self._partial[chunk.key] = self._reused_prompt(chunk)
                    partial = self._partial[chunk.key]
                    logits = extend_prompt(self._model, partial, part, self._device)
            except Exception as exc:
                self._partial.pop(chunk.key, None)
                failed.append((chunk.key, exc))
                continue
            if chunk.completes_prompt:
                del self._partial[chunk.key]
                joined.append(self._join_cache([chunk], partial.cache, [partial.length], logits))
        return joined

    def _reused_groups(self, chunks: Sequence[PrefillChunk]) -> list[list[PrefillChunk]]:
        """Whole rests of prompts that start from the same number of cached tokens (many
        users behind one system prompt), grouped to be fed as padded batches: one
        forward for a group costs about what one prompt's does on a CPU."""
        by_start: dict[int, list[PrefillChunk]] = {}
        for chunk in chunks:
            reuse = self._reuse.get(chunk.key)
            if chunk.completes_prompt and reuse is not None and reuse.tokens == chunk.start:
                by_start.setdefault(chunk.start, []).append(chunk)
        groups = []
        for members in by_start.values():
            for group in group_by_length([c.end - c.start for c in members]):
                if len(group) > 1:
                    groups.append([members[g] for g in group])
        return groups

    def _reused_prompt(self, chunk: PrefillChunk) -> PartialPrompt:
        """The one-row cache of a prompt whose prefix comes from the prefix cache."""
        reuse = self._reuse.pop(chunk.key, None)
        if reuse is None or reuse.tokens != chunk.start:
            raise RuntimeError("an earlier chunk of this prompt failed")
        return PartialPrompt(seeded_cache(reuse), reuse.tokens)

    def _join_cache(
        self,
        chunks: Sequence[PrefillChunk],
        cache: Any,
        lengths: Sequence[int],
        logits: torch.Tensor,
        *,
        right_padded: bool = False,
    ) -> tuple[list[int], torch.Tensor]:
        return self._join(
            chunks,
            logits,
            lengths,
            lambda keys, tokens: self._batch.join(
                keys, cache, lengths, tokens, right_padded=right_padded
            ),
        )

    def _join(
        self,
        chunks: Sequence[PrefillChunk],
        logits: torch.Tensor,
        lengths: Sequence[int],
        place: Callable[[list[int], torch.Tensor], object],
    ) -> tuple[list[int], torch.Tensor]:
        """Add prefilled rows to the decode batch with their first tokens; ``place``
        puts their caches into their slots."""
        batch, sampler = self._batch, self._sampler
        try:
            first = batch.rows
            batch.ensure(first + len(chunks), max(lengths))
            sampler.grow(batch.capacity_rows)
            slots = slice(first, first + len(chunks))
            sampler.place(
                first,
                [c.prepared.request.sampling for c in chunks],
                [c.prepared.prompt_ids for c in chunks],
                vocab=int(logits.shape[-1]),
            )
            keys = [c.key for c in chunks]
            self._guided.start(keys, [c.prepared.grammar for c in chunks])
            logits = self._guided.mask(logits, keys)
            tokens = sampler.sample(
                logits, slots, lambda: batch.transfer.to_device(list(lengths), torch.long)
            )
            sampler.record(tokens, slots)
            place(keys, tokens)
            if self.prefix is not None:
                for chunk in chunks:
                    self._history[chunk.key] = list(chunk.prepared.prompt_ids)
        except Exception as exc:  # some buffers may hold the new rows and others not
            self.reset()
            raise BatchLostError("adding prefilled rows to the batch failed") from exc
        return keys, tokens
