"""The running batch's tensors: one left-padded KV cache shared by every row.

Rows join (``concatenate``) and leave (``filter``) between steps, as in TGI's
``CausalLMBatch``. Padding never changes a row's result: every row carries its
own attention mask (zeros over its left padding) and its own position ids, so a
row computes exactly what it would alone, whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


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


def _layers(cache: DynamicCache) -> list[Any]:
    return list(cache.layers)


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
    cache = DynamicCache(config=model.config)
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


def concatenate(batches: Sequence[KVBatch]) -> KVBatch:
    """One batch of all rows, in order; shorter caches are padded on the left."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.width for b in batches)
    merged = _layers(batches[0].cache)
    for index, layer in enumerate(merged):
        parts = [_layers(b.cache)[index] for b in batches]
        layer.keys = torch.cat([_pad_left(p.keys, 2, width) for p in parts], dim=0)
        layer.values = torch.cat([_pad_left(p.values, 2, width) for p in parts], dim=0)
    mask = torch.cat([_pad_left(b.mask, 1, width) for b in batches], dim=0)
    positions = torch.cat([b.positions for b in batches])
    return KVBatch(batches[0].cache, mask, positions)


def filter_rows(batch: KVBatch, keep: Sequence[int]) -> KVBatch:
    """Keep these rows (in this order) and drop the left padding every kept row now has."""
    index = torch.tensor(list(keep), dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    mask = mask[:, start:]
    for layer in _layers(batch.cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return KVBatch(batch.cache, mask, batch.positions.index_select(0, index))
