"""The running batch's tensors: one left-padded KV cache shared by every row.

Rows join (:func:`append`) and leave (:func:`remove_rows`) between steps, as in
TGI's ``CausalLMBatch``. Padding never changes a row's result: every row carries
its own attention mask (zeros over its left padding) and its own position ids,
so a row computes what it would alone, whatever else is in the batch.

The cache layers are :class:`SlotLayer`: preallocated buffers with spare rows
and spare positions, so that a decode step writes only its own token, a joining
row is written into a free row, and a leaving row's slot is filled by moving the
last row into it. transformers' own DynamicLayer re-concatenates the whole cache
on every step instead, and rebuilding the batch on every join or leave would
copy all of it again: at 64 rows of 300 tokens that is about a gigabyte each time.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Spare positions reserved when a layer grows: one copy every so many steps.
_HEADROOM = 64
# Left padding every row shares is trimmed once it is this share of the width.
_TRIM_SHARE = 0.25


def _room(needed: int) -> int:
    return needed + max(_HEADROOM, needed // 2)


class SlotLayer(DynamicLayer):
    """One layer's keys and values in buffers with spare rows and positions.

    ``keys``/``values`` are views of the used part, ``[rows, heads, width, dim]``,
    as transformers expects; everything past them is free space.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.width = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None:
            self.rows = key_states.shape[0]
        assert key_states.shape[0] == self.rows, "a step feeds every row of the batch"
        new = key_states.shape[-2]
        self._reserve(self.rows, self.width + new, template=key_states)
        assert self._k is not None and self._v is not None
        self._k[: self.rows, :, self.width : self.width + new] = key_states
        self._v[: self.rows, :, self.width : self.width + new] = value_states
        self.width += new
        self._publish()
        assert self.keys is not None and self.values is not None
        return self.keys, self.values

    def _publish(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[: self.rows, :, : self.width]
        self.values = self._v[: self.rows, :, : self.width]

    def _reserve(self, rows: int, width: int, template: torch.Tensor, shift: int = 0) -> None:
        """Room for ``rows`` x ``width``; existing content moves ``shift`` positions right.

        A new buffer gets spare positions, and half again the rows when rows ran
        out, so growing costs one copy now and then, not one a step.
        """
        old_k, old_v = self._k, self._v
        if old_k is not None and old_v is not None and rows <= old_k.shape[0]:
            if width <= old_k.shape[2]:
                if shift:  # room enough: move the rows right in place
                    for slab in (old_k, old_v):
                        used = slab[: self.rows, :, : self.width].clone()
                        slab[: self.rows, :, :shift].zero_()
                        slab[: self.rows, :, shift : shift + self.width] = used
                return
            capacity_rows = old_k.shape[0]
        elif old_k is not None:
            capacity_rows = max(rows, old_k.shape[0] + old_k.shape[0] // 2)
        else:
            capacity_rows = rows
        shape = (capacity_rows, template.shape[1], _room(width), template.shape[-1])
        slabs = []
        for old in (old_k, old_v):
            # Uninitialised memory: only the used part is ever read, and it is all
            # written below or by the caller (zero-filling a slab took 10x longer).
            slab = template.new_empty(shape)
            if old is not None and self.rows and self.width:
                slab[: self.rows, :, :shift].zero_()
                slab[: self.rows, :, shift : shift + self.width] = old[: self.rows, :, : self.width]
            slabs.append(slab)
        self._k, self._v = slabs

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Add rows whose cache is right-aligned to ``width`` (the batch's new width)."""
        shift = width - self.width
        self._reserve(self.rows + keys.shape[0], width, template=keys, shift=shift)
        self.width = width
        assert self._k is not None and self._v is not None
        first, last, start = self.rows, self.rows + keys.shape[0], width - keys.shape[2]
        for slab, part in ((self._k, keys), (self._v, values)):
            slab[first:last, :, :start].zero_()  # a reused row keeps a former row's values
            slab[first:last, :, start:width] = part
        self.rows = last
        self._publish()

    def move_rows(self, targets: torch.Tensor, sources: torch.Tensor, rows: int) -> None:
        """Copy rows ``sources`` into ``targets`` and keep the first ``rows`` rows."""
        assert self._k is not None and self._v is not None
        if targets.numel():
            for slab in (self._k, self._v):
                slab[targets, :, : self.width] = slab[sources, :, : self.width]
        self.rows = rows
        self._publish()

    def trim_left(self, start: int) -> None:
        """Drop the first ``start`` positions, left padding in every row."""
        assert self._k is not None and self._v is not None
        kept = self.width - start
        for slab in (self._k, self._v):
            slab[: self.rows, :, :kept] = slab[: self.rows, :, start : self.width].clone()
        self.width = kept
        self._publish()


@dataclass
class KVBatch:
    """Cache, mask and positions of rows that decode together, in row order."""

    cache: DynamicCache
    # [rows, cached length]: 1 over a row's real tokens, 0 over its left padding.
    mask: torch.Tensor
    # [rows]: the position id of the next token each row feeds.
    positions: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


def new_cache(model: Any) -> DynamicCache:
    """A cache for ``model`` made of slot layers (see unsupported_cache_layers)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [SlotLayer() for _ in cache.layers]
    return cache


def unsupported_cache_layers(model: Any) -> list[str]:
    """The kinds of cache layer ``model`` needs that the shared batch cannot hold.

    Sliding-window layers keep only their window and count positions their own
    way; padding, joining and trimming them like full layers would break them.
    """
    cache = DynamicCache(config=model.config)
    return sorted(
        {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    )


def _layers(cache: DynamicCache) -> list[SlotLayer]:
    """The cache's layers; the loader refuses models whose layers are not all slot layers."""
    return [layer for layer in cache.layers if isinstance(layer, SlotLayer)]


def forward_prompts(
    model: Any, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[KVBatch, torch.Tensor]:
    """Prefill whole prompts as one left-padded batch; returns the batch and last logits."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    return KVBatch(cache, mask, lengths), out.logits[:, -1, :]


def extend_row(model: Any, batch: KVBatch, chunk: Sequence[int]) -> torch.Tensor:
    """Feed a further prompt chunk to a one-row batch (chunked prefill); returns last logits."""
    device = batch.mask.device
    ids = torch.tensor([list(chunk)], dtype=torch.long, device=device)
    new = torch.ones((1, len(chunk)), dtype=batch.mask.dtype, device=device)
    batch.mask = torch.cat([batch.mask, new], dim=1)
    start = int(batch.positions[0])
    positions = torch.arange(start, start + len(chunk), device=device).unsqueeze(0)
    out = model(
        input_ids=ids,
        attention_mask=batch.mask,
        position_ids=positions,
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    batch.positions = batch.positions + len(chunk)
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


def decode_step(model: Any, batch: KVBatch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; returns logits [rows, vocab]."""
    ones = torch.ones((batch.rows, 1), dtype=batch.mask.dtype, device=batch.mask.device)
    batch.mask = torch.cat([batch.mask, ones], dim=1)
    out = model(
        input_ids=tokens.view(-1, 1),
        attention_mask=batch.mask,
        position_ids=batch.positions.view(-1, 1),
        cache=batch.cache,
        use_cache=True,
    )
    batch.positions = batch.positions + 1
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits


def _pad_left(tensor: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def append(batch: KVBatch, joining: KVBatch) -> None:
    """Add ``joining``'s rows after ``batch``'s; the narrower side is padded on the left."""
    width = max(batch.width, joining.width)
    for layer, other in zip(_layers(batch.cache), _layers(joining.cache), strict=True):
        assert other.keys is not None and other.values is not None
        layer.append_rows(other.keys, other.values, width)
    batch.mask = torch.cat([_pad_left(batch.mask, 1, width), _pad_left(joining.mask, 1, width)])
    batch.positions = torch.cat([batch.positions, joining.positions])


def remove_rows(batch: KVBatch, drop: Collection[int]) -> list[int]:
    """Drop these rows; the last rows move into the freed slots.

    Returns, for each remaining row, the index it had before. Left padding that
    every remaining row shares is trimmed once it is a large part of the width.
    """
    rows = batch.rows
    left = rows - len(drop)
    order = list(range(left))
    holes = sorted(i for i in drop if i < left)
    movers = [i for i in range(left, rows) if i not in drop]
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    device = batch.mask.device
    index = torch.tensor(order, dtype=torch.long, device=device)
    targets = torch.tensor(holes, dtype=torch.long, device=device)
    sources = torch.tensor(movers, dtype=torch.long, device=device)
    for layer in _layers(batch.cache):
        layer.move_rows(targets, sources, left)
    batch.mask = batch.mask.index_select(0, index)
    batch.positions = batch.positions.index_select(0, index)
    _trim_shared_padding(batch)
    return order


def _trim_shared_padding(batch: KVBatch) -> None:
    used = batch.mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else batch.width
    if start == 0 or start < batch.width * _TRIM_SHARE:
        return
    for layer in _layers(batch.cache):
        layer.trim_left(start)
    batch.mask = batch.mask[:, start:]
